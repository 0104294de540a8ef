# Study 4 on real data (Keh et al. 2025): when images enter pretraining of the paper's two-tower model, on COCO + Visual
# Genome mixed with WikiText-103: from the start, from 80% of the steps, or after a text-only run whose text tower
# the image-text run starts from (configs/schedule_*.py); then NLVR2, SNLI-VE and RefCOCO; 3 seeds. The synthetic
# version (synthetic_image_schedule.py) is the one run here.
#   torchrun --standalone --nproc_per_node=2 study.py studies/image_schedule.py --data_root=/data
include("paper_tasks.py")
variants = {
    "from_start": ("../configs/schedule_images_from_start.py", {}),
    "at_80": ("../configs/schedule_images_at_80.py", {}),
    "text_then_images": [
        ("../configs/schedule_text_only.py", {"save_text_tower": "{run}/text_tower"}),
        ("../configs/schedule_text_then_images.py", {"text_tower": "{previous}/text_tower"}),
    ],
}
compare = [("at_80", "from_start"), ("text_then_images", "from_start"), ("at_80", "text_then_images")]

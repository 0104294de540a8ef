# When to introduce images (Keh et al. 2025, "Should VLMs be pre-trained with image data?"), arm 1 of 3: images from
# the start. The paper's two-tower model (freeze_none.py: ELECTRA-Small + DeiT-Tiny, 6 co-attention layers) with
# the text tower trained from scratch, as the study pretrains its language model, on COCO + VG mixed with
# WikiText-103: from the first step, half the optimizer steps are image-text (MLM + ITM), half text-only (MLM on the
# text tower alone). Arm 2: schedule_images_at_80.py. Arm 3: schedule_text_only.py, then schedule_text_then_images.py.
# WikiText-103 is read as distributed (wikitext-103-raw-v1.zip unpacked under data_root).
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/schedule_images_from_start.py --data_root=/data
include("freeze_none.py")
out_dir = "out/schedule_images_from_start"
text_pretrained = False  # ELECTRA-Small's architecture, random weights; its tokenizer
text_corpora = ["wikitext-103-raw/wiki.train.raw"]
text_only_fraction = 0.0
image_text_share = 0.5

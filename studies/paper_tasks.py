# Shared part of the real-data studies that fine-tune (each includes it; not a study by itself): 3 seeds, and the
# paper's downstream tasks NLVR2, SNLI-VE and RefCOCO with their real-data configs, scored on dev / val.
seeds = [0, 1, 2]
tasks = {
    "nlvr2": ("../configs/nlvr2.py", {}),
    "snli_ve": ("../configs/snli_ve.py", {}),
    "refcoco": ("../configs/refcoco.py", {}),
}
headline = {"nlvr2": ["nlvr2_acc (dev)"], "snli_ve": ["snli_ve_acc (dev)"], "refcoco": ["refcoco_acc (val)"]}

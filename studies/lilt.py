# Study 3 on real data (LilT): the BERT-base + ViT-B/16 dual encoder aligned by ITC on COCO + Visual Genome, training
# everything (configs/dual_full.py) against training only layer norms, only biases or only adapters inside the frozen
# pretrained towers (configs/dual_lilt.py trains all three); zero-shot retrieval on COCO and Flickr30k (Karpathy test
# splits); 3 seeds. The synthetic version (synthetic_lilt.py) is the one run here.
#   torchrun --standalone --nproc_per_node=2 study.py studies/lilt.py --data_root=/data
variants = {
    "full": ("../configs/dual_full.py", {}),
    "layernorm": ("../configs/dual_lilt.py", {"text_align": ["layernorm"], "vision_align": ["layernorm"]}),
    "bias": ("../configs/dual_lilt.py", {"text_align": ["bias"], "vision_align": ["bias"]}),
    "adapter": ("../configs/dual_lilt.py", {"text_align": ["adapter"], "vision_align": ["adapter"]}),
}
seeds = [0, 1, 2]
downstream = {"coco": ("coco_retrieval", {}), "f30k": ("f30k_retrieval", {})}
headline = {"coco": ["coco_tr_r1 (test)", "coco_ir_r1 (test)"], "f30k": ["f30k_tr_r1 (test)", "f30k_ir_r1 (test)"]}
compare = [("layernorm", "full"), ("bias", "full"), ("adapter", "full")]

# Paper experiment 2: the BERT-base-sized one-tower model with its layer stack initialised from pretrained BERT;
# word-piece and patch embeddings start at random (fresh), as in the paper.
#   torchrun --standalone --nproc_per_node=2 pretrain.py configs/onetower_bert.py --data_root=/path/to/data
include("onetower_random.py")
out_dir = "out/onetower_bert"
text_tower = "bert-base-uncased"
text_pretrained = True
tokenizer = ""  # BERT's own
text_hidden_size = -1  # keep the pretrained model's sizes
text_layers = -1
text_heads = -1
text_mlp_ratio = -1.0
text_dropout = -1.0

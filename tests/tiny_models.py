"""Tiny random-init transformers of every supported family, built offline from configs."""
import torch
import transformers as tf

VOCAB = 61


def make(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    elif family == "olmo2":
        cfg = tf.Olmo2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = tf.Olmo2ForCausalLM(cfg)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.Qwen2ForCausalLM(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        model = tf.GPTNeoXForCausalLM(cfg)
    elif family == "vit":
        cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=24, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=4, num_labels=5)
        model = tf.ViTForImageClassification(cfg)
    else:
        raise ValueError(family)
    # Random init of transformers is small; scale up so every factor has a real spectrum.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model.eval()


LM_FAMILIES = ["llama", "olmo2", "qwen2", "gpt2", "gpt_neox"]


def lm_batch(seed: int = 0, B: int = 3, L: int = 12, pad_rows=((0, 8), (2, 5))):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    mask = torch.ones_like(ids)
    for row, start in pad_rows:
        if row < B:
            mask[row, start:] = 0
            ids[row, start:] = 0
    return {"input_ids": ids, "attention_mask": mask}

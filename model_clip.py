"""
The CLIP ViT-L/14 text encoder (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", 2021) that conditions Stable Diffusion 1.x, and OpenAI's byte-level BPE
tokenizer, in plain PyTorch.

Parameter names are those of transformers' CLIPTextModel inside its `text_model.` (the keys of
tests/golden/clip_vitl14_text_hf.keys.tsv), so `text_encoder/model.safetensors` of a diffusers
folder and the `cond_stage_model.transformer.` part of an SD checkpoint load with strict=True once
the prefixes are stripped. The vocabulary (assets/bpe_simple_vocab_16e6.txt.gz) is OpenAI's, MIT
licensed: assets/LICENSE-CLIP-BPE.
"""
import functools
import gzip
import html
import re
import unicodedata
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import diffusers_file, load_strict, read_state_dict, strip_prefix

BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|>


#################################################################################
#                         Tokenizer (OpenAI CLIP simple_tokenizer.py)           #
#################################################################################

@functools.lru_cache()
def bytes_to_unicode():
    """
    A printable unicode character for each of the 256 bytes: printable Latin-1 bytes stand for
    themselves, the others (controls, space) are shifted to 256 + n, so that BPE never sees
    whitespace or control characters.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text):
    """
    CLIP's basic_clean + whitespace_clean, then lower case. ftfy.fix_text is replaced by NFC
    normalisation (its normalisation step, and what transformers' CLIP tokenizer does): text with
    mojibake or curly quotes, which ftfy would repair or straighten, is tokenised as it is.
    """
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


# CLIP's pattern, in the `regex` module, is
#   r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+".
# With Python's `re`: letters \p{L} -> [^\W\d_] (word characters but digits and "_"), numbers
# \p{N} -> \d (decimal digits), the rest -> (?:[^\s\w]|_). The one difference: numeric characters
# that are not decimal digits (², ½, Ⅻ, ①) count as letters here (joined to adjacent letters)
# but as numbers in CLIP (one token each).
PATTERN = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                     r"|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class CLIPTokenizer:
    """
    OpenAI CLIP's byte-level BPE. Ids: 256 byte symbols, the same 256 with the end-of-word mark
    "</w>", one id per merge (the first 48894 lines after the header of the merges file), then
    <|startoftext|> and <|endoftext|>: 49408 in all. __call__ gives SD 1.x's (B, 77) ids: start, at
    most 75 tokens, end, padded with the end id.
    """
    def __init__(self, bpe_path=BPE_PATH):
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def bpe(self, token):
        """Split one pre-token (bytes as characters) into vocabulary entries: merge the best-ranked
        pair until none is left."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text):
        """Text to BPE ids, without start/end tokens."""
        ids = []
        for token in PATTERN.findall(clean_text(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self.bpe(token))
        return ids

    def decode(self, ids):
        """Ids back to (cleaned) text."""
        text = "".join(self.decoder[int(i)] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def __call__(self, prompts, context_length=77):
        """A prompt or a list of prompts to a (B, context_length) LongTensor: SOT, tokens[:75], EOT,
        EOT padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.full((len(prompts), context_length), EOT, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [SOT] + self.encode(prompt)[:context_length - 2] + [EOT]
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return ids


@functools.lru_cache()
def _default_tokenizer():
    return CLIPTokenizer()


def tokenize(prompts, context_length=77):
    """SD 1.x token ids of a prompt or list of prompts: a (B, 77) LongTensor (see
    CLIPTokenizer.__call__)."""
    return _default_tokenizer()(prompts, context_length)


#################################################################################
#                         Text Encoder (transformers CLIPTextModel)             #
#################################################################################

class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (with bias), causal."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens <= i
        return self.out_proj(x.transpose(1, 2).flatten(2))


class CLIPMLP(nn.Module):
    """Two-layer MLP with quick_gelu, x * sigmoid(1.702 x), the activation CLIP was trained with."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))


class CLIPEncoderLayer(nn.Module):
    """A pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    def __init__(self, dim, num_heads, hidden_dim):
        super().__init__()
        self.self_attn = CLIPAttention(dim, num_heads)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.mlp = CLIPMLP(dim, hidden_dim)
        self.layer_norm2 = nn.LayerNorm(dim)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""
    def __init__(self, vocab_size, dim, max_positions):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_positions, dim)

    def forward(self, input_ids):
        return self.token_embedding(input_ids) + self.position_embedding.weight[:input_ids.shape[1]]


class CLIPTextModel(nn.Module):
    """
    CLIP's text transformer (transformers' CLIPTextTransformer: embeddings, encoder.layers,
    final_layer_norm). forward(input_ids) returns last_hidden_state (B, T, D), after the final layer
    norm (what SD 1.x feeds the UNet as context), and the pooled output (B, D): the hidden state at
    the first end-of-text token, which is what transformers 5 picks for this config (eos_token_id
    49407) in both of its branches.
    """
    def __init__(self, vocab_size=49408, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77):
        super().__init__()
        self.config = dict(vocab_size=vocab_size, hidden_size=hidden_size,
                           intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=num_attention_heads,
                           max_position_embeddings=max_position_embeddings)
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        layers = [CLIPEncoderLayer(hidden_size, num_attention_heads, intermediate_size)
                  for _ in range(num_hidden_layers)]
        # transformers' key path: encoder.layers.N
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(layers)))
        self.final_layer_norm = nn.LayerNorm(hidden_size)

    def forward(self, input_ids):
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        x = self.final_layer_norm(x)
        eot = (input_ids == EOT).int().argmax(dim=-1)  # first end-of-text position (0 if none)
        return x, x[torch.arange(x.shape[0], device=x.device), eot]


# openai/clip-vit-large-patch14, its text half
CLIP_VITL14 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77)
CLIP_TINY = dict(CLIP_VITL14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4)


@torch.no_grad()
def encode_text(model, prompts):
    """(context (B, 77, D), pooled (B, D)) of a list of prompts: what SD's UNet and a
    text-conditioned DiT read. The token ids go to a GPU from pinned memory, without waiting."""
    return model(to_device(tokenize(list(prompts)), model.final_layer_norm.weight.device))


def to_device(tensor, device):
    """A host tensor on `device`: on CUDA copied from pinned memory, queued (the host goes on)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def caption_embeddings(text_encoder, captions):
    """
    What a text DiT (model_dit.TextEmbedder) reads as y: the pooled CLIP embeddings (N, text_dim)
    of the captions, with an empty caption as the all-zero row, i.e. the null embedding. train.py
    and sample.py both call this.
    """
    pooled = encode_text(text_encoder, captions)[1].float()
    empty = to_device(torch.tensor([not c.strip() for c in captions]), pooled.device)
    return torch.where(empty[:, None], torch.zeros_like(pooled), pooled)


#################################################################################
#                                Checkpoint Loading                             #
#################################################################################

_HF_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin",
             "pytorch_model.fp16.bin")


def clip_text_state_dict(path):
    """
    The text encoder's weights in `path`, under this module's keys: a diffusers folder
    (text_encoder/model.safetensors or pytorch_model.bin) or that text_encoder/ folder, an SD single
    file (cond_stage_model.transformer.[text_model.]*), or a transformers file (text_model.*; a full
    CLIPModel file keeps only its text half). position_ids buffers stored by older transformers are
    dropped.
    """
    if Path(path).is_dir():
        path = diffusers_file(path, "text_encoder", _HF_FILES)
    sd = read_state_dict(path)
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    for prefix in ("cond_stage_model.transformer.", "text_model."):
        if any(k.startswith(prefix) for k in sd):
            sd = strip_prefix(sd, prefix)
    return {k: v for k, v in sd.items() if not k.endswith("position_ids")}


def infer_clip_config(sd):
    """
    The config a text encoder state dict's shapes imply, or None if it is not one. The head count is
    not in the shapes: CLIP's heads are 64 wide (ViT-L/14: 12 of 768, ViT-H: 16 of 1024); tiny test
    encoders (under 64) have 4.
    """
    try:
        vocab, width = sd["embeddings.token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        return dict(vocab_size=vocab, hidden_size=width,
                    intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
                    num_hidden_layers=layers, num_attention_heads=width // 64 if width >= 64 else 4,
                    max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0])
    except (KeyError, ValueError, TypeError):
        return None


def load_clip_text(path, config=CLIP_VITL14, dtype=torch.float32):
    """
    CLIPTextModel(**config) with the weights in `path` (see clip_text_state_dict), in `dtype`, built
    on the meta device; config=None takes it from the shapes (infer_clip_config). A file that does
    not fit raises CheckpointError naming the missing, unexpected and mis-shaped keys.
    """
    sd = clip_text_state_dict(path)
    config = config or infer_clip_config(sd) or CLIP_VITL14
    with torch.device("meta"):
        model = CLIPTextModel(**config)
    return load_strict(model, sd, path, "a CLIP text encoder of this config", dtype=dtype)

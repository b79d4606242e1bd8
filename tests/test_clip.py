"""model_clip.py against transformers' CLIPTextModel and SD 1.x's token ids (tests/golden/README.md)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import CheckpointError
from conftest import rel_err
from model_clip import CLIP_VITL14, EOT, SOT, CLIPTextModel, CLIPTokenizer, load_clip_text, tokenize


GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN / "clip_text_tiny.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    config = {k: v for k, v in json.loads(meta["config"]).items() if k in CLIP_VITL14}
    return tensors, state, config, json.loads(meta["prompts"])


def test_token_ids_equal_the_golden_ones(golden):
    g, _, _, prompts = golden
    assert torch.equal(tokenize(prompts), g["input_ids"])  # incl. accents, CJK, an emoji, a truncated prompt
    assert torch.equal(tokenize(prompts[3]), g["input_ids"][3:4])
    long = tokenize(prompts[4])[0]
    assert long[0] == SOT and long[76] == EOT and (long[1:76] != EOT).all()  # 75 tokens kept


def test_tokenizer_vocabulary_and_decode():
    tok = CLIPTokenizer()
    assert len(tok.encoder) == 49408 and tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT
    text = "a photograph of an astronaut riding a horse"
    assert tok.decode(tok.encode(text)).strip() == text
    assert tok.encode("  A &amp; B\n\tC ") == tok.encode("a & b c")  # html unescape, whitespace, lower case


def test_hidden_states_match(golden):
    g, state, config, _ = golden
    model = CLIPTextModel(**config)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        hidden, pooled = model(g["input_ids"])
    ref = g["last_hidden_state"]
    assert rel_err(hidden, ref) < 1e-5  # measured 7.4e-8
    first_eot = [row.tolist().index(EOT) for row in g["input_ids"]]
    assert rel_err(pooled, ref[torch.arange(len(ref)), first_eot]) < 1e-5


def test_vitl14_keys_shapes_and_count_on_meta():
    with torch.device("meta"):
        model = CLIPTextModel(**CLIP_VITL14)
    rows = [line.split("\t") for line in (GOLDEN / "clip_vitl14_text_hf.keys.tsv").read_text().splitlines()]
    assert [(k, str(tuple(v.shape))) for k, v in model.state_dict().items()] == [(k, s) for k, s, _ in rows]
    counts = json.loads((GOLDEN / "param_counts_sd.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == counts["clip_text_vitl14"]


def test_checkpoint_layouts_load(golden, tmp_path):
    g, state, config, _ = golden
    position_ids = torch.arange(77)[None]
    sd_new = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in state.items()}
    sd_new["cond_stage_model.transformer.text_model.embeddings.position_ids"] = position_ids
    sd_new["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of an SD checkpoint is ignored
    save_file(sd_new, tmp_path / "sd.safetensors")
    sd_old = {f"cond_stage_model.transformer.{k}": v for k, v in state.items()}
    torch.save({"state_dict": sd_old}, tmp_path / "sd_old.ckpt")
    (tmp_path / "text_encoder").mkdir()
    hf = {f"text_model.{k}": v for k, v in state.items()} | {"text_model.embeddings.position_ids": position_ids}
    save_file(hf, tmp_path / "text_encoder" / "model.safetensors")
    for path in (tmp_path / "sd.safetensors", tmp_path / "sd_old.ckpt", tmp_path, tmp_path / "text_encoder"):
        model = load_clip_text(path, config)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), path
    with torch.no_grad():
        assert rel_err(model(g["input_ids"])[0], g["last_hidden_state"]) < 1e-5


def test_wrong_file_is_one_clear_sentence(golden, tmp_path):
    _, state, _, _ = golden
    save_file(state, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_clip_text(tmp_path / "tiny.safetensors")  # a tiny encoder is not ViT-L/14
    assert "\n" not in str(e.value) and "tiny.safetensors" in str(e.value) and "wrong shape" in str(e.value)
    with pytest.raises(CheckpointError, match="text_encoder/model.safetensors"):
        load_clip_text(tmp_path)  # a folder without text_encoder/


def test_caption_embeddings_are_the_pooled_output_and_zero_for_no_caption(golden, tmp_path):
    """A text DiT's y (model_clip.caption_embeddings): the pooled output (EOS state), all zeros for an empty caption."""
    from model_clip import caption_embeddings, encode_text, infer_clip_config
    g, state, config, prompts = golden
    assert infer_clip_config(state) == config and infer_clip_config({}) is None
    save_file({f"text_model.{k}": v for k, v in state.items()}, tmp_path / "model.safetensors")
    model = load_clip_text(tmp_path, config=None)  # a text_encoder folder, config from the shapes
    captions = [prompts[0], "", prompts[1], "   "]
    y = caption_embeddings(model, captions)
    context, pooled = encode_text(model, captions)
    eos = [row.tolist().index(EOT) for row in tokenize(captions)]
    assert torch.equal(pooled, context[torch.arange(4), eos])  # pooled: the first end-of-text token's state
    assert torch.equal(y[[0, 2]], pooled[[0, 2]]) and not y[[1, 3]].any()
    assert rel_err(y[0], g["last_hidden_state"][0, eos[0]]) < 1e-5  # against transformers' hidden states


def test_caption_embeddings_under_bf16_autocast_are_fp32s_to_bf16_rounding(golden):
    """
    train.py runs the text encoder inside the step's autocast (bf16 matmuls on a GPU). On the golden
    tiny CLIP, under CPU bf16 autocast: each matmul reads inputs rounded to bf16 (relative error at
    most u = 2^-9), and a pooled embedding passes through at most 4 matmuls in sequence (an
    attention branch's v and out projections, an MLP's fc1 and fc2), each adding at most u to the
    relative error of what it reads: within 4u = 2^-7 per caption (measured: about 0.9u). Empty
    captions stay the all-zero null embedding.
    """
    from model_clip import caption_embeddings
    _, state, config, prompts = golden
    model = CLIPTextModel(**config)
    model.load_state_dict(state)
    captions = [*prompts, ""]
    ref = caption_embeddings(model.eval(), captions).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = caption_embeddings(model, captions)
    empty = ~ref.any(-1)
    assert y.dtype == torch.float32 and empty[-1] and not y[empty].any()
    rel = (y.double() - ref)[~empty].norm(dim=-1) / ref[~empty].norm(dim=-1)
    print(f"bf16 autocast vs fp32, pooled: relative L2 error per caption max {rel.max():.2e}, "
          f"median {rel.median():.2e}")
    assert 0 < rel.max() <= 2 ** -7

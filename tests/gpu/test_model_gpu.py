"""The TP model on one GPU against transformers: fp32 logits (TF32 off), greedy tokens through the CUDA-graph
decode step, and bf16 graph decode equal to eager decode. Skipped without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, (4.0 if "embed" in name else 1.0) / p.shape[1] ** 0.5)
    path = str(tmp_path_factory.mktemp("gpu_ckpt") / "llama")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_fp32_prefill_and_graph_decode_match_transformers(checkpoint):
    from fastattn_dist.models.llama import LlamaForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    hf, path = checkpoint
    hf = hf.cuda()
    ids = torch.randint(3, 1000, (1, 300), generator=torch.Generator().manual_seed(1)).cuda()
    ours = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        ref = hf(ids).logits[0].float()
        got = ours(ids)[0]
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-3
        want = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)[0, 300:].tolist()
    assert ours.generate(ids, 24, stop_tokens=[], cuda_graph=True)[0] == want


def test_bf16_graph_decode_equals_eager_and_tracks_transformers(checkpoint):
    from fastattn_dist.models.llama import LlamaForCausalLM

    hf, path = checkpoint
    hf = hf.to("cuda", torch.bfloat16)
    ours = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda")
    prompts = [list(range(5, 260)), list(range(40, 70))]  # different lengths: padded batch
    graph = ours.generate(prompts, 16, stop_tokens=[], cuda_graph=True)
    eager = ours.generate(prompts, 16, stop_tokens=[], cuda_graph=False)
    assert graph == eager
    with torch.no_grad():  # the first new token's logits against transformers (bf16 rounding differs)
        ours.reset_cache(1, 512)
        mine = ours.prefill(torch.tensor([prompts[0]], device="cuda"))[0]
        ref = hf(torch.tensor([prompts[0]], device="cuda")).logits[0, -1].float()
    assert ((mine - ref).abs().max() / ref.abs().max()).item() < 5e-2


def test_wavefront_prefill_equals_one_stream_and_tracks_one_tile(checkpoint):
    """Tiles on their own streams, issued by anti-diagonals, compute what one stream computes (the same kernels on
    the same rows), and stay within bf16 rounding of the one-tile prefill; also as one CUDA-graph replay."""
    from fastattn_dist.models.bench_model import PrefillVariant
    from fastattn_dist.models.llama import LlamaForCausalLM

    _, path = checkpoint
    ids = torch.randint(3, 1000, (2, 777), generator=torch.Generator().manual_seed(2)).cuda()
    outs = {}
    for schedule in ("one", "wavefront"):
        m = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device="cuda", prefill_schedule=schedule)
        with torch.no_grad():
            outs[schedule] = m(ids, tiles=3)
            outs["t1"] = m(ids, tiles=1)
            graphed = PrefillVariant(m, ids, m.plan_for(2, 777, 3), m.comm)
            graphed.replay()
            outs[schedule + "_graph"] = graphed.logits
    assert torch.equal(outs["one"], outs["wavefront"])
    assert torch.equal(outs["wavefront"][:, -1], outs["wavefront_graph"])
    assert ((outs["wavefront"] - outs["t1"]).abs().max() / outs["t1"].abs().max()).item() < 3e-2

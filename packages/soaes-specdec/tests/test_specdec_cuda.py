"""On a CUDA GPU: the compiled Triton kernel equals the reference, and the decoder (kernel auto-selected) is exact.

These are the GPU counterparts of `test_specdec_kernel.py` (interpreter) and the CPU exactness tests; they skip
cleanly without a GPU. The reference runs on the same device with the same float64 uniforms, so accepted counts
and tokens must agree exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

triton = pytest.importorskip("triton")

from soaes_specdec import decoding  # noqa: E402
from soaes_specdec.decoding import SpeculativeDecoder  # noqa: E402
from soaes_specdec.sampling import SamplingParams  # noqa: E402
from soaes_specdec.testing import random_verify_block  # noqa: E402
from soaes_specdec.verify import kernel_available, verify_reference  # noqa: E402

CUDA = torch.device("cuda")

# (do_sample, temperature, top_p, top_k, batch, n, vocab, logits dtype)
CASES = [
    (False, 1.0, 1.0, 0, 8, 3, 1000, torch.float32),
    (False, 1.0, 1.0, 0, 8, 5, 152_064, torch.bfloat16),
    (False, 1.0, 1.0, 0, 8, 5, 152_064, torch.float32),
    (True, 1.0, 1.0, 0, 8, 3, 1000, torch.float32),
    (True, 0.7, 0.9, 0, 8, 4, 1000, torch.float32),
    (True, 1.0, 0.7, 50, 6, 3, 777, torch.float32),
    (True, 1.3, 1.0, 7, 6, 2, 500, torch.float32),
    (True, 1.0, 1.0, 0, 4, 3, 152_064, torch.float32),
    (True, 0.7, 0.95, 0, 4, 3, 152_064, torch.float32),
    (True, 1.0, 0.7, 20, 4, 9, 152_064, torch.bfloat16),
]


def test_kernel_is_selected_on_cuda_up_to_its_vocabulary_limit() -> None:
    assert kernel_available(CUDA) and kernel_available(CUDA, 49_152)
    assert not kernel_available(CUDA, 152_064)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", CASES, ids=[f"sample{c[0]:d}-t{c[1]}-p{c[2]}-k{c[3]}-b{c[4]}-n{c[5]}-V{c[6]}-{c[7]}"
                                             for c in CASES])
def test_compiled_kernel_equals_reference(case: tuple, seed: int) -> None:
    from soaes_specdec.kernel import verify_fused

    do_sample, temperature, top_p, top_k, batch, n, vocab, dtype = case
    params = SamplingParams(do_sample, temperature, top_p, top_k)
    block = random_verify_block(batch, n, vocab, params, seed=vocab + n + 1000 * seed, device=CUDA, dtype=dtype)
    fused = verify_fused(params=params, **block)
    ref = verify_reference(params=params, **block)
    assert fused[0].tolist() == ref[0].tolist()
    assert fused[1].tolist() == ref[1].tolist()


@pytest.fixture(scope="module")
def pair(qwen2_factory: Any) -> tuple[Any, Any]:
    target = qwen2_factory(0, layers=3, vocab=1000, hidden=64, init=0.2).to(CUDA)
    draft = qwen2_factory(1, layers=1, vocab=1000, hidden=64, init=0.2).to(CUDA)
    return target, draft


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_greedy_on_cuda_equals_plain_greedy(pair: tuple[Any, Any], n: int, batch: int) -> None:
    target, draft = pair
    g = torch.Generator().manual_seed(batch)
    lengths = [5, 9, 13][:batch]
    prompts = [torch.randint(2, 1000, (k,), generator=g) for k in lengths]
    for prompt in prompts:  # per row, against plain greedy of that row alone
        ids = prompt[None].to(CUDA)
        plain = decoding.autoregressive_generate(target, ids, 40).sequences
        spec = SpeculativeDecoder(target, draft, n).generate(ids, 40)
        assert spec.sequences.tolist() == plain.tolist()
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, prompt in enumerate(prompts):  # left-padded batch
        ids[i, width - prompt.numel():] = prompt
        mask[i, width - prompt.numel():] = 1
    plain = decoding.autoregressive_generate(target, ids.to(CUDA), 40, attention_mask=mask.to(CUDA))
    spec = SpeculativeDecoder(target, draft, n).generate(ids.to(CUDA), 40, attention_mask=mask.to(CUDA))
    assert spec.sequences.tolist() == plain.sequences.tolist()


def test_speculative_sampling_on_cuda_matches_target_distribution(qwen2_factory: Any) -> None:
    """The chi-square test of `test_specdec_decoding_chisq.py`, with the compiled kernel doing the verification."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("chisq", Path(__file__).with_name("test_specdec_decoding_chisq.py"))
    chisq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chisq)
    NEW, PROMPT, SAMPLES, VOCAB = chisq.NEW, chisq.PROMPT, chisq.SAMPLES, chisq.VOCAB
    chi_square_p, exact_joint = chisq.chi_square_p, chisq.exact_joint
    target = qwen2_factory(11, layers=2, vocab=VOCAB, hidden=16, init=0.3, heads=1, kv_heads=1)
    draft = qwen2_factory(12, layers=1, vocab=VOCAB, hidden=16, init=0.3, heads=1, kv_heads=1)
    for n, top_p, temperature in [(3, 0.7, 0.7), (1, 1.0, 1.0), (9, 0.95, 1.0)]:
        params = SamplingParams(True, temperature, top_p)
        joint = exact_joint(target, params)
        g = torch.Generator(device=CUDA).manual_seed(n)
        out = SpeculativeDecoder(target.to(CUDA), draft.to(CUDA), n, use_kernel=True).generate(
            PROMPT.expand(SAMPLES, -1).to(CUDA), NEW, do_sample=True, temperature=temperature, top_p=top_p,
            generator=g)
        target.cpu()
        draft.cpu()
        samples = out.sequences[:, PROMPT.numel():].cpu()
        assert chi_square_p(samples, joint) > 1e-3, (n, top_p, temperature)

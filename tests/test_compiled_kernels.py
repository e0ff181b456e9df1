"""Which Triton variants a stream of serving steps needs (issue 13), checked on the CPU.

Triton compiles a kernel once per specialization key: each constexpr's value, each plain
integer's class (== 1, divisible by 16, or neither), each pointer's alignment and the launch
options. These tests replace every parspec kernel's launch by a recorder that computes the key
Triton would compile under (with Triton's own binder, no GPU needed) and runs nothing, then
feed the launchers the shapes that change from step to step: token counts, batch sizes,
sequence lengths, block-table widths, split counts, speculation depths. The keys must follow
only what warm_up() covers (the attention query tile, the depth), never the rest.
tests/gpu/test_compile_variants_gpu.py checks the same on a GPU, through the engine."""

from __future__ import annotations

import contextlib
import os
import re
from collections import defaultdict

import pytest
import torch

from parspec import attention, compiled_kernels, layer_kernels
from parspec.attention import AttentionMetadata, _attn_config, paged_attention_triton
from parspec.batch_invariant import matmul_triton
from parspec.metadata import decode_metadata_triton
from parspec.speculative.draft_inputs import draft_inputs_triton
from parspec.speculative.verify import _block_k, verify_greedy_triton, verify_rejection_triton
from tests.test_attention import make_case

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _binder(kernel):
    """Triton's own argument binder for ``kernel``: (args, kwargs) -> its specialization."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper: rebuild what a GPU compiles
        kernel = JITFunction(kernel.fn, do_not_specialize=kernel.kwargs.get("do_not_specialize"),
                             do_not_specialize_on_alignment=kernel.kwargs.get("do_not_specialize_on_alignment"))
    return create_function_from_signature(kernel.signature, kernel.params, BaseBackend)


@contextlib.contextmanager
def compile_keys():
    """Within: parspec's kernel launches (and compiles without a launch) run nothing and record,
    per kernel name, the set of keys they would compile under."""
    keys: dict[str, set] = defaultdict(set)
    kernels = compiled_kernels.triton_kernels()
    saved_siblings, attention._SPLIT_SIBLINGS = attention._SPLIT_SIBLINGS, set()  # as in a fresh process
    for name, kernel in kernels.items():
        bind = _binder(kernel)

        def run(*args, grid, warmup, _name=name, _bind=bind, **kwargs):
            _, specialization, options = _bind(*args, **kwargs)
            keys[_name.rsplit(".", 1)[1]].add((tuple(specialization), tuple(sorted(options.items()))))

        kernel.run = run  # shadows the method: kernel[grid](...) calls self.run
    try:
        yield keys
    finally:
        attention._SPLIT_SIBLINGS = saved_siblings
        for kernel in kernels.values():
            vars(kernel).pop("run", None)


def test_every_kernel_module_is_counted():
    """A module that defines a Triton kernel must be in KERNEL_MODULES, or its compiles go uncounted."""
    found = set()
    for root, _, files in os.walk(os.path.join(REPO, "parspec")):
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".py") and re.search(r"^@triton\.jit", open(path, encoding="utf-8").read(), re.M):
                found.add(os.path.relpath(path, REPO)[:-3].replace(os.sep, "."))
    assert found == set(compiled_kernels.KERNEL_MODULES)
    assert "_paged_attn_kernel" in {n.rsplit(".", 1)[1] for n in compiled_kernels.triton_kernels()}


def test_compiled_variants_count_nothing_without_a_gpu_launch():
    assert compiled_kernels.num_compiled_variants() == 0 or torch.cuda.is_available()


def _attention_steps(group: int):
    """Steps of a serving engine: prefills of many lengths, decodes and verifications at many
    batch sizes and context lengths, mixed batches, block tables of every width."""
    steps = []
    for q_len in (1, 2, 3, 5, 8, 9, 16, 17, 31, 48, 64, 65, 100, 300):
        steps.append(([q_len], [q_len]))  # a prefill alone
        steps.append(([q_len, 1, 4], [q_len + 20, 700, 33]))  # with decode rows
    for batch in (1, 2, 3, 4, 7, 8, 16, 17, 32):
        for q_len in (1, 4, 8):
            steps.append(([q_len] * batch, [q_len + 37 * (b + 1) for b in range(batch)]))
    return steps


@pytest.mark.parametrize("dtype,group", [(torch.float32, 2), (torch.bfloat16, 4), (torch.bfloat16, 1)])
def test_attention_compiles_two_variants_per_query_tile(dtype, group):
    """Per tile, split and unsplit, the second compiled with the first whichever the step needs."""
    head_dim, num_kv_heads = 64, 2
    tiles = set()
    with compile_keys() as keys:
        for i, (q_lens, seq_lens) in enumerate(_attention_steps(group)):
            q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, num_kv_heads, group, head_dim, 16, dtype=dtype,
                                                  seed=i, pad_blocks=i % 5, poison=False)
            paged_attention_triton(q, k_cache, v_cache, meta, 0.125)
            meta.max_seq_len = 4096  # the runner's fixed bound: a deeper split grid
            paged_attention_triton(q, k_cache, v_cache, meta, 0.125)
            tiles.add(_attn_config(dtype, head_dim, group, meta.max_query_len)[0])
    assert len(keys["_paged_attn_kernel"]) == 2 * len(tiles) >= 4, sorted(keys["_paged_attn_kernel"])
    assert len(keys["_attn_reduce_kernel"]) == 1  # every split count, every token count


def test_batch_invariant_attention_variants_do_not_follow_the_context():
    with compile_keys() as keys:
        for i, (q_lens, seq_lens) in enumerate(_attention_steps(2)):
            q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, 2, 2, 64, 16, seed=i, pad_blocks=i % 3,
                                                  poison=False)
            for max_seq_len in (max(seq_lens), 4096):  # 1 to 16 splits of 256 keys
                meta.max_seq_len = max_seq_len
                for merge in (None, True, False):
                    paged_attention_triton(q, k_cache, v_cache, meta, 0.125, batch_invariant=True,
                                           merge_in_program=merge)
    assert len(keys["_paged_attn_kernel"]) == 2  # the split grid and the in-program merge
    assert len(keys["_attn_merge_kernel"]) == 1


def test_query_positions_add_a_variant():
    q, k_cache, v_cache, meta = make_case([7, 7], [30, 50], 2, 2, 64, 16, poison=False)
    with compile_keys() as keys:
        for pos_base in (0, 5):
            positions = torch.arange(14, dtype=torch.int64) + pos_base
            m = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                  7, 4096, query_positions=positions)
            paged_attention_triton(q, k_cache, v_cache, m, 0.125)
        paged_attention_triton(q, k_cache, v_cache, meta, 0.125)
    assert len(keys["_paged_attn_kernel"]) == 4  # with and without positions, each split or not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_kernels_do_not_follow_the_token_count(dtype):
    hidden, heads, kv_heads, head_dim, inter = 256, 4, 2, 64, 384
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(hidden, generator=g).to(dtype)
    head_weight = torch.randn(head_dim, generator=g).to(dtype)
    k_cache = torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    cos = torch.randn(512, head_dim // 2)
    sin = torch.randn(512, head_dim // 2)
    w = torch.randn(hidden, hidden, generator=g).to(dtype)
    with compile_keys() as keys:
        for t in (1, 2, 3, 7, 8, 15, 16, 17, 32, 33, 41, 48, 64, 300):
            x = torch.randn(t, hidden, generator=g).to(dtype)
            layer_kernels.rms_norm_triton(x, weight, 1e-5)
            layer_kernels.add_rms_norm_triton(x, x.clone(), weight, 1e-5)
            layer_kernels.rms_norm_triton(x[-1:], weight, 1e-5)  # a last-token view
            qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, head_dim)
            layer_kernels.rms_norm_triton(q, head_weight, 1e-5)  # Qwen3's q norm over a strided view
            positions = torch.arange(t, dtype=torch.int64)
            layer_kernels.rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, positions)
            layer_kernels.silu_and_mul_triton(torch.randn(t, 2 * inter, generator=g).to(dtype))
            matmul_triton(x, w)
    # rms_norm: rows without and with the residual add, and head rows
    assert {name: len(k) for name, k in keys.items()} == {
        "_rms_norm_kernel": 3, "_rope_and_write_kv_kernel": 1, "_silu_and_mul_kernel": 1, "_matmul_kernel": 1}


def test_verification_compiles_one_variant_per_depth_class():
    vocab = 96
    g = torch.Generator().manual_seed(0)
    with compile_keys() as keys:
        for k in range(0, 8):
            for rows in (1, 2, 3, 8, 16, 17):
                drafts = torch.randint(0, vocab, (rows, k + 1), generator=g)[:, 1:]  # a column view, as the runner's
                num_drafts = torch.full((rows,), k, dtype=torch.int32)
                logits = torch.randn(rows, k + 1, vocab, generator=g)
                verify_greedy_triton(drafts, num_drafts, logits)
                probs = logits.softmax(-1)
                uniforms, noise = torch.rand(rows, k, generator=g), torch.rand(rows, vocab, generator=g) + 0.1
                verify_rejection_triton(drafts, num_drafts, None, probs, uniforms, noise)
                if k:
                    q = torch.softmax(torch.randn(rows, 7, vocab, generator=g), -1)[:, :k]  # the drafter's K=7 rows
                    verify_rejection_triton(drafts, num_drafts, q, probs, uniforms, noise)
            drafts = torch.zeros(5, 0, dtype=torch.int64)  # a prefill: no drafts
            verify_greedy_triton(drafts, torch.zeros(5, dtype=torch.int32), torch.randn(5, 1, vocab, generator=g))
    depth_classes = len({_block_k(k) for k in range(8)})
    assert len(keys["_greedy_kernel"]) == depth_classes
    # HAS_Q False at every depth, True at every depth but 0; stride_pb = q * V follows the
    # depth (V = 96 is a multiple of 16: its class never changes)
    assert len(keys["_rejection_kernel"]) == depth_classes + len({_block_k(k) for k in range(1, 8)})


def test_metadata_kernels_do_not_follow_the_batch():
    with compile_keys() as keys:
        for width in (1, 2, 3, 16, 17, 32, 40):
            for rows in (1, 2, 5, 16):
                tables = torch.zeros(rows, width, dtype=torch.int32)
                base = torch.zeros(rows, dtype=torch.int64)
                for q_len in (1, 8):
                    decode_metadata_triton(base, tables, q_len, 16)
                out = torch.zeros(rows, 8, dtype=torch.int64)
                draft_inputs_triton(out, torch.zeros(rows, dtype=torch.int32), base, tables, 16, 6, 5)
    assert len(keys["_decode_metadata_kernel"]) == 2  # q 1 and q 8
    assert len(keys["_draft_inputs_kernel"]) == 1

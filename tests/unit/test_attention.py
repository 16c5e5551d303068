"""Segment attention for packed rows: the same logits and gradients as transformers' own
block-diagonal mask, each example as if alone, and transformers' SDPA for everything else."""

import pytest
import torch

from tunehub.trainer.attention import NAME, segment_bounds, use_segment_attention
from tunehub.trainer.data import SFTCollator, pack_examples


def test_segment_bounds_start_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    assert segment_bounds(positions, 2) == [[(0, 3), (3, 5), (5, 9)], [(0, 7), (7, 9)]]
    # positions given once for the whole batch; a jump (not only a restart) starts a segment too
    assert segment_bounds(torch.tensor([[0, 1, 5, 6]]), 3) == [[(0, 2), (2, 4)]] * 3


def test_bounds_are_computed_once_per_positions_tensor():
    from tunehub.trainer.attention import _bounds_for_forward

    positions = torch.tensor([[0, 1, 0, 1]])
    first = _bounds_for_forward(positions, 1)
    assert _bounds_for_forward(positions, 1) is first  # every layer of one forward: computed once
    assert _bounds_for_forward(positions, 2) == [[(0, 2), (2, 4)]] * 2  # another batch size
    positions[0, 2:] = torch.tensor([2, 3])  # changed in place: computed again
    assert _bounds_for_forward(positions, 1) == [[(0, 4)]]
    assert _bounds_for_forward(torch.tensor([[0, 1, 0, 1]]), 1) == first  # another tensor, same values


def _models(path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    segmented = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    use_segment_attention(segmented)
    assert segmented.config._attn_implementation == NAME
    assert reference.config.num_key_value_heads < reference.config.num_attention_heads  # GQA is covered
    return reference.train(), segmented.train()  # train mode: the path a training step takes


def _packed_batch(lengths_per_row: list[list[int]], pad_token_id: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for lengths in lengths_per_row:
        for n in lengths:
            ids = torch.randint(3, 500, (n,), generator=gen).tolist()
            examples.append({"input_ids": ids, "labels": ids})
    blocks = pack_examples(examples, block_size=sum(max(lengths_per_row, key=sum)))
    return examples, SFTCollator(pad_token_id)(blocks)


def test_packed_rows_match_the_block_mask_and_each_example_alone(tiny_llama_path):
    reference, segmented = _models(tiny_llama_path)
    examples, batch = _packed_batch([[30, 17, 9], [40, 5], [12]], reference.config.pad_token_id or 0)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] >= 2
    # no cache: with one, transformers stops telling packed segments apart (as Trainer runs it)
    out_ref = reference(**batch, use_cache=False)
    out_seg = segmented(**batch, use_cache=False)
    torch.testing.assert_close(out_seg.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_seg.loss, out_ref.loss, atol=1e-6, rtol=1e-6)
    out_ref.loss.backward()
    out_seg.loss.backward()
    grads_ref = dict((n, p.grad) for n, p in reference.named_parameters())
    for name, param in segmented.named_parameters():
        torch.testing.assert_close(param.grad, grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    # each example's logits equal its logits computed alone
    with torch.no_grad():
        logits = segmented(**batch, use_cache=False).logits
        ids = batch["input_ids"]
        for example in examples:
            alone = segmented(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            n = len(example["input_ids"])
            found = False
            for row in range(ids.shape[0]):
                for start in range(ids.shape[1] - n + 1):
                    if ids[row, start : start + n].tolist() == example["input_ids"]:
                        torch.testing.assert_close(logits[row, start : start + n], alone, atol=1e-5, rtol=1e-5)
                        found = True
                        break
                if found:
                    break
            assert found


def test_padded_batches_and_generation_take_transformers_sdpa(tiny_llama_path):
    reference, segmented = _models(tiny_llama_path)
    reference.eval()
    segmented.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(
            segmented(input_ids=ids, attention_mask=mask).logits, reference(input_ids=ids, attention_mask=mask).logits
        )
        kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
        assert segmented.generate(ids[:1], **kwargs).tolist() == reference.generate(ids[:1], **kwargs).tolist()


@pytest.mark.parametrize("packing", [True, False])
def test_sft_runs_use_segment_attention_only_when_packed(packing, tiny_llama_path, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    from tunehub.trainer.config import validate_run_config
    from tunehub.trainer.run import load_base_model

    config = validate_run_config(
        {
            "base": {"path": str(tiny_llama_path)},
            "method": {"name": "lora", "r": 4},
            "objective": {"name": "sft"},
            "data": {"train": [str(tmp_path / "d.jsonl")], "packing": packing},
            "output": {"dir": str(tmp_path / "out")},
        }
    )
    model = load_base_model(tiny_llama_path, config)
    assert (model.config._attn_implementation == NAME) is packing

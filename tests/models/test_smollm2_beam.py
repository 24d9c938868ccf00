"""Beam search on the real embedded model equals transformers' beam search on the same GGUF."""
import pytest

from pagedjax import LLM, BeamSearchParams


@pytest.mark.parametrize("width", [2, 4])
def test_smollm2_beam_search_matches_transformers(smollm2, smollm2_transformers, width):
    import torch

    tok = smollm2.tokenizer
    prompt = tok.encode("The three primary colours are")
    llm = LLM(loaded=smollm2, num_gpu_blocks_override=64, max_model_len=512)
    ours = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=8))[0]
    out = smollm2_transformers.generate(
        torch.tensor([prompt]), num_beams=width, do_sample=False, max_new_tokens=8,
        length_penalty=1.0, early_stopping=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    hf = out.sequences[0, len(prompt):].tolist()
    best = ours.sequences[0]
    print(f"width {width}: {tok.decode(best.tokens[len(prompt):])!r} score {best.score:.4f}")
    assert best.tokens[len(prompt):] == hf
    assert best.score == pytest.approx(float(out.sequences_scores[0]), abs=1e-3)

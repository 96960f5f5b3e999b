import math

import torch

from quipc.eval.perplexity import perplexity


def test_uniform_model_has_vocab_perplexity():
    windows = torch.randint(0, 50, (3, 17))
    result = perplexity(lambda ids: torch.zeros(ids.shape[1], 50), windows, progress=False)
    assert math.isclose(result["ppl"], 50, rel_tol=1e-6) and result["tokens"] == 3 * 16


def test_counts_positions_1_to_end():
    """A model that is certain of the right next token scores ppl 1; position 0 is never scored."""
    windows = torch.tensor([[5, 1, 2, 3]])

    def oracle(ids):
        logits = torch.full((4, 8), -1e9)
        logits[torch.arange(3), ids[0, 1:]] = 0
        return logits
    assert math.isclose(perplexity(oracle, windows, progress=False)["ppl"], 1.0)

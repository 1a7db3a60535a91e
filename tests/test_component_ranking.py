import torch

from mechlie.causal.component_ranking import difference_scores, rank_family


def test_difference_score_finds_planted_component_and_ignores_scale():
    g = torch.Generator().manual_seed(0)
    honest = torch.randn(40, 5, 16, generator=g)
    lying = torch.randn(40, 5, 16, generator=g)
    lying[:, 2] += 1.5  # component 2 differs
    scale = torch.tensor([1.0, 100.0, 1.0, 1.0, 0.01])[None, :, None]
    s = difference_scores(honest * scale, lying * scale)
    assert s.argmax().item() == 2
    assert torch.allclose(difference_scores(honest, lying), s, rtol=1e-4)
    r = rank_family("mlp", s, torch.tensor([0.0, 0.1, -0.9, 0.05, 0.0]), top_k=2)
    assert r.top_by_score[0] == (2,) and r.top_by_effect[0] == (2,)
    assert r.overlap() >= 1

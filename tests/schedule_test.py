"""The recipes' optimizer: AdamW with warm-up and cosine or linear (Trainer's) decay."""

import numpy as np
import pytest
import torch
import transformers

from klora.training import adamw_with_warmup
from klora.training.optimizer import LinearWarmupDecay


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 7), (3, 3)])
def test_linear_schedule_matches_transformers(warmup, total):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1e-3)
    reference = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total + 2):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    schedule = LinearWarmupDecay(1e-3, warmup, total)
    got = [float(schedule(step)) for step in range(total + 2)]
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_trainer_like_optimizer_settings_and_config_round_trip():
    optimizer = adamw_with_warmup(5e-4, 200, weight_decay=0.0, schedule="linear", clip_norm=1.0)
    assert optimizer.global_clipnorm == 1.0 and optimizer.weight_decay == 0.0
    restored = type(optimizer).from_config(optimizer.get_config())
    assert restored.global_clipnorm == 1.0
    assert float(restored._learning_rate(100)) == pytest.approx(float(optimizer._learning_rate(100)))
    assert float(optimizer._learning_rate(20)) == pytest.approx(5e-4)
    assert float(optimizer._learning_rate(110)) == pytest.approx(2.5e-4)
    default = adamw_with_warmup(5e-4, 200)
    assert default.global_clipnorm is None and default.weight_decay == 0.01
    with pytest.raises(ValueError, match="Unknown schedule 'step'"):
        adamw_with_warmup(5e-4, 200, schedule="step")

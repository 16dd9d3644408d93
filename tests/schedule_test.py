"""The recipes' optimizer: AdamW with warm-up and cosine or linear (Trainer's) decay."""

import keras
import numpy as np
import pytest
import torch
import transformers

from klora.speed.compile_cache import CompileTime
from klora.training import adamw_with_warmup
from klora.training.optimizer import CosineWarmupDecay, LinearWarmupDecay


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


@pytest.mark.parametrize("warmup, total", [(10, 100), (0, 7), (3, 3), (5, 6)])
def test_cosine_schedule_matches_keras_cosine_decay(warmup, total):
    reference = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(total - warmup, 1), warmup_target=1e-3, warmup_steps=warmup)
    schedule = CosineWarmupDecay(1e-3, warmup, total)
    steps = range(total + 3)
    np.testing.assert_allclose([float(schedule(step)) for step in steps],
                               [float(reference(step)) for step in steps], rtol=1e-6, atol=1e-10)
    assert float(schedule(warmup // 2)) > 0 or warmup < 2


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="counts JAX compilations")
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_reading_the_learning_rate_does_not_compile_every_step(schedule):
    optimizer = adamw_with_warmup(5e-4, 200, schedule=schedule)
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    float(optimizer.learning_rate)  # the element-wise ops compile once
    with CompileTime() as compiling:
        for step in range(1, 6):
            optimizer.iterations.assign(step * 30)
            float(optimizer.learning_rate)
    assert compiling.seconds < 0.05

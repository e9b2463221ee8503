"""Bad input is refused at the Python boundary with a ValueError that names what was expected."""

import numpy as np
import pytest

from jaxllm.models import cnn, linear, mlp
from jaxllm.training import OptimizerConfig
from jaxllm.training.supervised import train_supervised

SGD = OptimizerConfig("sgd", lr=0.1)


def run(config, x, y, loss, tmp_path):
    return train_supervised(config, (x, y), loss=loss, optimizer=SGD, out_dir=str(tmp_path), steps=1,
                            progress=False)


def test_wrong_feature_count(tmp_path):
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 2\].*got shape \(4, 3\)"):
        run(linear.LogisticConfig(2), np.zeros((4, 3)), np.zeros(4, int), "binary", tmp_path)
    with pytest.raises(ValueError, match=r"\[batch, 5\]"):
        mlp.raschka_appendix_a(5, 2).validate_input(np.zeros(5))


def test_wrong_image_shape(tmp_path):
    with pytest.raises(ValueError, match=r"images must have shape \[batch, 28, 28\].*got shape \(2, 8, 8\)"):
        run(cnn.mnist(), np.zeros((2, 8, 8)), np.zeros(2, int), "softmax", tmp_path)
    with pytest.raises(ValueError, match="grayscale"):
        cnn.mnist().validate_input(np.zeros((2, 28, 28, 3)))


def test_labels_out_of_range(tmp_path):
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\] \(10 classes\), got values from 0 to 10"):
        run(cnn.digits8x8(), np.zeros((3, 8, 8)), np.array([0, 10, 2]), "softmax", tmp_path)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\]"):
        run(linear.LogisticConfig(2), np.zeros((2, 2)), np.array([0, -1]), "binary", tmp_path)
    with pytest.raises(ValueError, match="labels has 3 entries but the inputs have 2 rows"):
        run(linear.LogisticConfig(2), np.zeros((2, 2)), np.array([0, 1, 1]), "binary", tmp_path)
    with pytest.raises(ValueError, match="whole numbers"):
        run(linear.LogisticConfig(2), np.zeros((2, 2)), np.array([0.5, 1.0]), "binary", tmp_path)


def test_nan_in_a_batch(tmp_path):
    x = np.ones((4, 2), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x contains 1 NaN/Inf value\(s\); inputs must be finite"):
        run(linear.LogisticConfig(2), x, np.zeros(4, int), "binary", tmp_path)
    y = np.ones((4, 1), np.float32)
    y[0] = np.inf
    with pytest.raises(ValueError, match="targets contains 1 NaN/Inf"):
        run(linear.LinearConfig(2, 1), np.ones((4, 2)), y, "mse", tmp_path)


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple of 4"):
        cnn.CNNConfig(image_size=10)
    with pytest.raises(ValueError, match="activation must be one of"):
        mlp.MLPConfig(activation="swish")

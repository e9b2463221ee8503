import pytest

from jaxllm.config import config_from_dict
from jaxllm.models import cnn, linear, mlp


@pytest.mark.parametrize("config", [linear.LinearConfig(3, 2), linear.LogisticConfig(4), mlp.raschka_appendix_a(5, 3),
                                    mlp.burkov_two_layer(), cnn.mnist(), cnn.digits8x8()], ids=str)
def test_config_json_round_trip(config):
    import json

    assert config_from_dict(json.loads(config.to_json())) == config


def test_unknown_family_or_field_is_refused():
    with pytest.raises(ValueError, match="unknown model family 'gpt5'"):
        config_from_dict({"family": "gpt5"})
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        config_from_dict({"family": "mlp", "depth": 3})

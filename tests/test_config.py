"""DBLLMConfig: validation with clear errors, serialisation, versioning."""

from __future__ import annotations

import json

import pytest

from dbllm_compile import CONFIG_VERSION, ConfigError, DBLLMConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"group_size": 60}, "multiple of 8"),
        ({"group_size": 0}, "multiple of 8"),
        ({"init": "absmax"}, "init must be"),
        ({"init_grid_points": 1}, "init_grid_points"),
        ({"init_refine_iters": -1}, "init_refine_iters"),
        ({"scale_dtype": "float8"}, "scale_dtype"),
        ({"include": [1, 2]}, "include must be"),
        ({"exclude": ("re:(unclosed",)}, "not a valid regular expression"),
        ({"version": CONFIG_VERSION + 1}, "not supported"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DBLLMConfig(**kwargs)


def test_frozen_and_string_patterns_become_tuples():
    cfg = DBLLMConfig(exclude="*.down_proj")
    assert cfg.exclude == ("*.down_proj",)
    with pytest.raises(Exception):
        cfg.group_size = 128  # type: ignore[misc]


def test_json_round_trip_and_unknown_keys():
    cfg = DBLLMConfig(group_size=128, include=("re:.*proj",), exclude=("lm_head",), init_refine_iters=2)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert DBLLMConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="unknown DBLLMConfig field"):
        DBLLMConfig.from_dict({**data, "bits": 3})

"""The model subcommands end to end, and the errors users get for bad checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from llm_pipeline.checkpoint.hf import load_pretrained
from llm_pipeline.cli import build_parser, main
from llm_pipeline.config import ConfigError


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"init", "export", "import", "generate", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.slow
def test_version_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "llm_pipeline", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "llm-pipeline" in out.stdout


def test_info_7b_prints_exact_parameter_count(capsys):
    assert main(["info", "--preset", "7b", "--json"]) == 0
    out = capsys.readouterr().out
    assert "7,391,678,464" in out and "DOES NOT FIT" in out
    data = json.loads(out.strip().splitlines()[-1])
    assert data["parameters"] == 7_391_678_464 and data["memory_gib"]["fits"] is False


def test_init_export_import_generate_round_trip(tmp_path, capsys):
    init = tmp_path / "init"
    assert main(["init", "--preset", "debug", "--set", "tie_word_embeddings=true", "-o", str(init), "--seed", "3"]) == 0
    assert (init / "config.json").is_file() and (init / "model.safetensors").is_file()
    exported = tmp_path / "export"
    assert main(["export", str(init), str(exported), "--dtype", "bfloat16"]) == 0
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    imported = tmp_path / "imported"
    assert main(["import", str(exported), str(imported)]) == 0
    a, b = load_pretrained(init), load_pretrained(imported)
    torch.testing.assert_close(b.lm_head.weight.float(), a.lm_head.weight.bfloat16().float())
    capsys.readouterr()
    assert main(["generate", str(init), "--ids", "1 2 3", "--max-new-tokens", "5"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt_ids"] == [1, 2, 3] and len(line["new_ids"]) == 5


def test_bad_override_key_exits_with_named_key(tmp_path, capsys):
    code = main(["init", "--preset", "debug", "--set", "hiden_size=64", "-o", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "hiden_size" in err and "hidden_size" in err


def test_generate_without_tokenizer_says_what_to_do(tmp_path, capsys):
    main(["init", "--preset", "debug", "-o", str(tmp_path / "m")])
    code = main(["generate", str(tmp_path / "m"), "--prompt", "hello"])
    assert code == 1 and "--tokenizer" in capsys.readouterr().err


def _hf_dir(tmp_path, **overrides):
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        **overrides,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_hf_configs_are_refused(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_pretrained(_hf_dir(tmp_path, **overrides))


def test_pickle_only_checkpoint_is_never_loaded(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="never unpickled"):
        load_pretrained(d)


def test_corrupt_and_mismatched_weights(tmp_path):
    d = _hf_dir(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="corrupt"):
        load_pretrained(d)
    save_file({"model.embed_tokens.weight": torch.zeros(32, 16)}, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match="missing"):
        load_pretrained(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("flags", [["--top-p", "0", "--temperature", "1"], ["--top-k", "-1"]])
def test_generate_rejects_impossible_sampling(tmp_path, capsys, flags):
    main(["init", "--preset", "debug", "-o", str(tmp_path / "m")])
    assert main(["generate", str(tmp_path / "m"), "--ids", "1 2", *flags]) == 1
    assert "top_p" in capsys.readouterr().err


def test_hf_config_variants_that_transformers_accepts(tmp_path):
    from llm_pipeline.checkpoint.hf import model_config_from_hf

    base = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2}  # fmt: skip
    cfg = model_config_from_hf({**base, "architectures": ["LlamaForCausalLM"], "hidden_act": "swish",
                                "num_key_value_heads": None, "rope_theta": None, "rope_scaling": None,
                                "pretraining_tp": 1, "torch_dtype": "bfloat16"})  # fmt: skip
    assert cfg.num_key_value_heads == 2 and cfg.rope_theta == 10000.0
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        model_config_from_hf({**base, "model_type": "llama", "num_key_value_heads": 0})


def _imports(path) -> set[str]:
    """``module.name`` of every ``from llm_pipeline... import name`` in a file (top level or in functions)."""
    import ast

    tree = ast.parse(path.read_text())
    return {
        f"{node.module}.{alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_pipeline")
        for alias in node.names
    }


def test_the_model_and_ckpt_commands_only_parse_and_print():
    """Each command calls one function of the part that owns the work (issue 17: a CLI that only parses)."""
    from pathlib import Path

    import llm_pipeline.commands.ckpt as ckpt_cmd
    import llm_pipeline.commands.model as model_cmd

    model_imports = _imports(Path(model_cmd.__file__))
    assert {i for i in model_imports if i.startswith("llm_pipeline.checkpoint")} == {
        "llm_pipeline.checkpoint.export.init_model", "llm_pipeline.checkpoint.export.export_model",
        "llm_pipeline.checkpoint.export.import_model", "llm_pipeline.checkpoint.hf.read_model_config",
    }  # fmt: skip
    forbidden = ("llm_pipeline.checkpoint.dcp", "llm_pipeline.model.llama", "llm_pipeline.model.generate.",
                 "llm_pipeline.data", "llm_pipeline.train", "llm_pipeline.hardware")  # fmt: skip
    ckpt_imports = _imports(Path(ckpt_cmd.__file__))
    assert not [i for i in model_imports | ckpt_imports if i.startswith(forbidden)]
    assert {i.rsplit(".", 1)[0] for i in ckpt_imports} <= {
        "llm_pipeline.checkpoint.manager", "llm_pipeline.checkpoint.archive", "llm_pipeline.checkpoint.fsio",
    }  # fmt: skip


def test_generate_chat_and_text_go_through_one_helper(tmp_path):
    from llm_pipeline.model.completions import complete

    main(["init", "--preset", "debug", "-o", str(tmp_path / "m")])
    [record] = complete(tmp_path / "m", ids=[[1, 2, 3]], max_new_tokens=3)
    assert record["prompt_ids"] == [1, 2, 3] and len(record["new_ids"]) == 3
    with pytest.raises(ValueError, match="--system with --chat"):
        complete(tmp_path / "m", ids=[[1]], system="be brief")

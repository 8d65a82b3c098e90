"""Config validation: every bad value gets one sentence naming the option."""

import os

import pytest
from conftest import heavy_modules_after

from raytl.config import Choice, Decode, ExtractConfig, Layer, Pool, Precision
from raytl.errors import ConfigError


def test_defaults_are_the_vgg16_preset():
    config = ExtractConfig.create(source="s3://b/in", output="s3://b/out")
    assert (config.layer, config.pool, config.precision) == (Layer.POOL5, Pool.AVG, Precision.AUTO)
    assert (config.image_size, config.resize) == (224, 256)
    assert ExtractConfig.create(source="a", output="b", image_size=64).resize == 73
    assert ExtractConfig.create(source="a", output="b", image_size=64, resize_size=64).resize == 64


MAX_ERRORS = "--max-errors must be a count of files (0, 1, ...) or a share below 1 (0.05 or 5%), "


@pytest.mark.parametrize(
    "options,message",
    [
        ({"layer": "pool4"}, "--layer must be one of pool5, fc6, fc7, not 'pool4'."),
        ({"pool": "median"}, "--pool must be one of avg, max, flatten, not 'median'."),
        ({"precision": "int8"}, "--precision must be one of auto, fp32, bf16, fp16, not 'int8'."),
        ({"decode": "tpu"}, "--decode must be one of cpu, draft, gpu, not 'tpu'."),
        ({"max_errors": "lots"}, MAX_ERRORS + "not 'lots'."),
        ({"label_field": "caption"}, "--label-field must be cls, txt or json:FIELD, not 'caption'."),
        ({"label_field": "json:"}, "--label-field must be cls, txt or json:FIELD, not 'json:'."),
        ({"max_errors": "1.5"}, MAX_ERRORS + "not '1.5'."),
        ({"max_errors": "-3"}, MAX_ERRORS + "not '-3'."),
        ({"image_size": 16}, "--image-size must be an integer between 32 and 2048, not 16."),
        ({"image_size": 64, "resize_size": 60}, "--resize-size must be at least --image-size (64), not 60."),
        ({"batch_size": 0}, "--batch-size must be an integer at least 1, not 0."),
        (
            {"num_actors": -1},
            "--num-actors must be a count (4) or a range MIN-MAX (1-8; MIN at least 1), not -1.",
        ),
        ({"layer": "fc6", "pool": "max"}, "--pool max applies to --layer pool5 only, not --layer fc6."),
        ({"output": ""}, "OUTPUT is empty: give a directory or URI to write embeddings to."),
    ],
)
def test_bad_values(options, message):
    with pytest.raises(ConfigError) as info:
        ExtractConfig.create(**{"source": "a", "output": "b", **options})
    assert str(info.value) == message


@pytest.mark.parametrize(
    "given,files,limit", [(None, 100, None), ("0", 100, 0), ("7", 100, 7), ("0.05", 1000, 50), ("5%", 30, 1)]
)
def test_max_errors_is_a_count_or_a_share(given, files, limit):
    assert ExtractConfig.create(source="a", output="b", max_errors=given).error_limit(files) == limit


def test_cli_options_reach_the_configs():
    from raytl.cli import build_parser, extract_config, train_config

    parser = build_parser()
    config = extract_config(
        parser.parse_args(["extract", "s3://b/in", "out", "--pool", "max", "--image-size", "64"])
    )
    assert (config.source, config.output, config.pool, config.image_size, config.resize) == (
        "s3://b/in",
        os.path.abspath("out"),  # Ray's workers run elsewhere: local paths are made absolute
        Pool.MAX,
        64,
        73,
    )
    config = extract_config(parser.parse_args(["extract", "--manifest", "m.csv", "out"]))
    assert (config.source, config.manifest) == (None, os.path.abspath("m.csv"))
    assert (config.decode, config.compile) == (Decode.CPU, False)
    config = extract_config(parser.parse_args(["extract", "a", "b", "--decode", "gpu", "--compile"]))
    assert (config.decode, config.compile) == (Decode.GPU, True)
    with pytest.raises(ConfigError, match="extract takes OUTPUT with --manifest, not 2 paths"):
        extract_config(parser.parse_args(["extract", "--manifest", "m.csv", "a", "b"]))
    train = train_config(
        parser.parse_args(["train", "e", "m", "--backend", "sklearn", "--class-weight", "balanced"])
    )
    assert (train.embeddings, train.model_dir, str(train.backend), str(train.class_weight)) == (
        os.path.abspath("e"),
        os.path.abspath("m"),
        "sklearn",
        "balanced",
    )


def test_the_cli_answers_help_and_usage_errors_without_torch_or_ray():
    """`raytl --help` took 7-9 s and 1.1 GB when cli.py imported the pipeline: it must stay light (here as
    `python -m raytl`, the command where its script is not on PATH)."""
    import subprocess
    import sys

    assert heavy_modules_after("raytl.cli", ("torch", "torchvision", "ray", "pyarrow", "numpy")) == []
    usage = subprocess.run(
        [sys.executable, "-m", "raytl", "extract", "--pool", "median"], capture_output=True, text=True
    )
    assert usage.returncode == 2 and "usage: raytl extract" in usage.stderr


def test_command_modules_import_shared_layers_never_each_other():
    """A command module (one a verb) builds on raytl's shared layers (pipeline, training, classifier, ...);
    only the CLI, the Python API and the quickstart (a run of three verbs) import commands."""
    import ast
    import pathlib

    import raytl

    package = pathlib.Path(raytl.__file__).parent
    commands = {p.stem for p in (package / "commands").glob("*.py")} - {"__init__"}
    assert commands == {
        "extract",
        "train",
        "curve",
        "select",
        "audit",
        "finetune",
        "predict",
        "export",
        "serve",
        "pack",
        "inspect",
        "quickstart",
    }
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("raytl.commands.") or n == "raytl.commands" for n in names):
                importers.add(str(path.relative_to(package)))
    assert importers == {"cli.py", "__init__.py", "commands/quickstart.py"}
    # predict and finetune run the image stages with a pipeline.Stages of their own, never an extract config
    # (whose rules about OUTPUT and SOURCE would silently become theirs).
    for command in ("predict", "finetune"):
        calls = [
            node
            for node in ast.walk(ast.parse((package / "commands" / f"{command}.py").read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func).startswith("ExtractConfig")
        ]
        assert calls == [], command


def test_every_option_has_one_home_in_the_configs():
    """The parsers are made from the config fields: every field with help is a flag, its default is the
    config's (nothing given on the command line means the config's default applies) and Choice fields
    list their values (a value not among them is the config's one sentence, as from the Python API)."""
    import argparse
    import dataclasses

    from raytl.cli import build_parser
    from raytl.config import (
        ExportConfig,
        ExtractConfig,
        FinetuneConfig,
        PackConfig,
        PredictConfig,
        ServeConfig,
        TrainConfig,
        flag,
    )

    parser = build_parser()
    verbs = {a.dest: a for a in parser._actions if isinstance(a, argparse._SubParsersAction)}
    commands = next(iter(verbs.values())).choices
    for verb, config in (
        ("extract", ExtractConfig),
        ("train", TrainConfig),
        ("finetune", FinetuneConfig),
        ("predict", PredictConfig),
        ("export", ExportConfig),
        ("serve", ServeConfig),
        ("pack", PackConfig),
    ):
        actions = {a.dest: a for a in commands[verb]._actions}
        for item in dataclasses.fields(config):
            if "help" not in item.metadata:
                continue
            action = actions[item.name]
            assert flag(item) in action.option_strings and action.default is argparse.SUPPRESS
            if isinstance(item.default, Choice):  # listed in the help, refused by the config
                assert action.metavar == "{" + ",".join(c.value for c in type(item.default)) + "}"
    assert FinetuneConfig.create(source="s", model_dir="m").augment is True
    help_text = commands["finetune"].format_help()
    assert "--no-augment" in help_text and "{none,block1,block2,block3,block4,block5}" in help_text
    assert "(default block4)" in help_text and "example:" in help_text
    assert "SOURCE MODEL_DIR [" not in commands["finetune"].format_usage()  # no repeatable pairs


def test_options_of_raytl_itself_are_taken_after_the_verb_too():
    from raytl.cli import build_parser

    parser = build_parser()
    after = parser.parse_args(["inspect", "out", "--quiet", "--log-format", "json", "--retries", "2"])
    before = parser.parse_args(["--quiet", "--log-format", "json", "--retries", "2", "inspect", "out"])
    for args in (after, before):
        assert (args.quiet, args.log_format, args.retries, args.log_level) == (True, "json", 2, "warning")
    plain = parser.parse_args(["--log-level", "info", "inspect", "out"])  # not reset by the verb's parser
    assert (plain.log_level, plain.quiet, plain.retries) == ("info", False, None)


def test_python_api_keywords_are_the_flags():
    """raytl.extract(..., image_size=64) is --image-size 64; a misspelt keyword or a bad value is one
    ConfigError sentence before any Ray work."""
    import raytl

    with pytest.raises(ConfigError, match=r"^extract has no option 'imagesize' \(nor --imagesize\)\.$"):
        raytl.extract("in", "out", imagesize=64)
    with pytest.raises(ConfigError, match="--head must be one of logreg, svm, not 'tree'"):
        raytl.train("e", "m", head="tree")
    with pytest.raises(ConfigError, match="--val and --val-fraction exclude each other"):
        raytl.finetune("s", "m", val="v", val_fraction=0.3)
    with pytest.raises(ConfigError, match="INPUT is empty"):
        raytl.predict("m", None, "out")
    with pytest.raises(ConfigError, match="OUT must name a .pt2 file"):
        raytl.export("m", "model.onnx")
    with pytest.raises(ConfigError, match="--route-prefix must start with /, not 'api'"):
        raytl.serve("m", route_prefix="api")
    with pytest.raises(ConfigError, match="--mlflow-experiment is empty"):
        raytl.train("e", "m", mlflow_experiment="")
    with pytest.raises(ConfigError, match="embed has no option 'source'"):
        raytl.embed(None, source="x")


def test_python_api_signatures_list_every_option_from_its_config():
    """inspect.signature (what help(), IDEs and Tab completion read) shows each function's options as
    keywords, made from its config: the same names, defaults (a choice as its string) and help texts;
    `import raytl` still loads neither torch nor Ray."""
    import dataclasses
    import inspect

    import raytl
    from raytl import config

    verbs = {"extract": config.ExtractConfig, "train": config.TrainConfig, "curve": config.CurveConfig,
             "select": config.SelectConfig, "audit": config.AuditConfig, "finetune": config.FinetuneConfig,
             "predict": config.PredictConfig, "export": config.ExportConfig, "serve": config.ServeConfig,
             "embed": config.EmbedConfig, "load": config.LoadConfig}  # fmt: skip
    for verb, config_class in verbs.items():
        function = getattr(raytl, verb)
        parameters = inspect.signature(function).parameters
        keywords = {n: p for n, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        options = {f.name: f for f in dataclasses.fields(config_class) if "help" in f.metadata}
        positional = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        renamed = {"source"} if verb == "predict" else set()  # predict's INPUT fills `source`
        assert set(keywords) == set(options) - set(positional) - renamed, verb
        for name, parameter in keywords.items():
            default = options[name].default
            assert parameter.default == (str(default) if isinstance(default, config.Choice) else default)
            assert f"    {name}={parameter.default!r}: {options[name].metadata['help']}" in function.__doc__
    assert list(inspect.signature(raytl.predict).parameters)[:3] == ["model_dir", "input", "output"]
    assert inspect.signature(raytl.extract).parameters["image_size"].default is None
    assert inspect.signature(raytl.extract).parameters["device"].default == "auto"
    assert heavy_modules_after("raytl", ("torch", "torchvision", "ray", "pyarrow", "numpy")) == []


def test_an_option_shared_by_verbs_is_declared_once_in_its_group():
    """Options that mean the same in every verb (the backbone, image limits, tracking, workers, ...) live in
    one option group each, with one default, one help text and one check; only these names are declared by
    more than one home, because their meaning or default is the verb's own (an epoch of a linear head is
    not one of a network; the probe's --head is a loss, finetune's an input layer)."""
    import dataclasses

    from raytl import config

    homes: dict[str, set[str]] = {}
    verbs = (config.ExtractConfig, config.EmbedConfig, config.TrainConfig, config.FinetuneConfig)
    for cls in (*verbs, config.PredictConfig, config.PackConfig, config.ExportConfig, config.ServeConfig):
        assert issubclass(cls, config.Validated)  # every config is built by the one create
        for item in dataclasses.fields(cls):
            if "help" in item.metadata:
                home = next(k for k in cls.__mro__ if item.name in k.__dict__.get("__annotations__", {}))
                homes.setdefault(item.name, set()).add(home.__name__)
    shared = {name for name, where in homes.items() if len(where) > 1}
    assert shared == {"seed", "batch_size", "weights", "max_failures", "head", "epochs", "lr"}
    assert homes["max_pixels"] == {"ImageLimits"} and homes["mlflow_uri"] == {"Tracking"}
    assert homes["weights"] == {"BackboneOptions", "MovedWeights"}  # the weights to use; where they moved

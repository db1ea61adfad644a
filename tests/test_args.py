"""The command line's S3 settings: no secrets in argv (they show in `ps`), credentials from the environment."""

from __future__ import annotations

import argparse

import pytest

from dynrefer import storage
from pipelines import cli
from pipelines.args import add_storage_args, storage_options_from_args


def parsed(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_storage_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("flag", ["--s3-key", "--s3-secret"])
@pytest.mark.parametrize("program", ["synth", "caption", "evaluate", "prepare"])
def test_secret_flags_are_refused_with_a_pointer_to_the_environment(program, flag, capsys):
    argv = {"synth": ["synth", "--out", "s3://b/x"], "caption": ["caption", "--model", "m", "--out", "o"],
            "evaluate": ["evaluate", "--predictions", "p", "--prepared", "d", "--out", "o"],
            "prepare": ["prepare", "--config", "c.yaml"]}[program]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, flag, "AKIASECRETVALUE"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{flag}: S3 credentials are not taken on the command line" in err
    assert "AWS_ACCESS_KEY_ID" in err and "`ps`" in err and "AKIASECRETVALUE" not in err


def test_credentials_endpoint_region_and_profile_come_from_the_environment():
    env = {"AWS_ACCESS_KEY_ID": "AKIA1", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "tok",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert storage_options_from_args(parsed(), env) == {
        "key": "AKIA1", "secret": "s3cr3t", "token": "tok",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}}
    flags = parsed("--s3-endpoint", "http://127.0.0.1:1", "--s3-region", "us-east-2")
    assert storage_options_from_args(flags, env)["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:1",
                                                                       "region_name": "us-east-2"}
    assert storage_options_from_args(parsed("--s3-profile", "minio"), {}) == {"profile": "minio"}
    assert storage_options_from_args(parsed(), {"AWS_PROFILE": "lab"}) == {"profile": "lab"}
    assert storage_options_from_args(parsed(), {}) == {}  # botocore's own chain, in each process
    with pytest.raises(ValueError, match="set together"):
        storage_options_from_args(parsed(), {"AWS_ACCESS_KEY_ID": "AKIA1"})


def test_a_program_writes_to_s3_with_credentials_from_the_environment(s3_server, monkeypatch):
    so = s3_server["storage_options"]
    storage.filesystem("s3://args-bucket", so)[0].mkdir("args-bucket")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server["endpoint_url"])
    assert cli.main(["synth", "--out", "s3://args-bucket/corpus", "--num-images", "10", "--quiet"]) == 0
    assert len(storage.read_json("s3://args-bucket/corpus/image_data.json", so)) == 10

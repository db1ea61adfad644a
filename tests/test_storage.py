"""dynrefer.storage: local paths and s3:// URIs behind one interface, S3 credentials as explicit options."""

import json
import os

import pytest

from dynrefer import storage


def test_local_files_are_written_whole_and_listed_by_name(tmp_path):
    uri = storage.join(str(tmp_path), "a", "b.json")
    assert uri == os.path.join(str(tmp_path), "a", "b.json") and not storage.exists(uri)
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.read_json(uri) == {"x": [1, 2]} and storage.exists(uri)
    storage.write_bytes(storage.join(str(tmp_path), "a", "c.bin"), b"\x00\x01")
    assert storage.read_bytes("file://" + str(tmp_path / "a" / "c.bin")) == b"\x00\x01"
    assert storage.listdir(str(tmp_path / "a")) == ["b.json", "c.bin"]  # no temporary left behind
    assert storage.listdir(str(tmp_path / "nowhere")) == []
    storage.write_bytes(storage.join(str(tmp_path), "a", "d.bin"), b"")
    storage.remove(storage.join(str(tmp_path), "a", "d.bin"))
    storage.remove(storage.join(str(tmp_path), "a", "d.bin"))  # already gone: fine
    assert storage.listdir(str(tmp_path / "a")) == ["b.json", "c.bin"]
    (tmp_path / "bad.json").write_text('{"x": 1,\n oops}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 2 column 2"):
        storage.read_json(str(tmp_path / "bad.json"))
    assert storage.local_copy(str(tmp_path / "a")) == str(tmp_path / "a")
    assert storage.local_copy("file://" + str(tmp_path / "a")) == str(tmp_path / "a")
    fs, path = storage.arrow_filesystem(str(tmp_path / "a"))
    assert path == str(tmp_path / "a") and fs.type_name == "local"


def test_s3_options_come_from_arguments_then_the_environment():
    assert storage.s3_options() == {}
    assert storage.s3_options("http://h:9", "k", "s", "eu") == {
        "key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://h:9", "region_name": "eu"}}
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t", "AWS_REGION": "eu",
           "AWS_ENDPOINT_URL_S3": "http://h:9", "AWS_PROFILE": "p"}
    assert storage.s3_options_from_env(env) == {"key": "k", "secret": "s", "token": "t",
                                                "client_kwargs": {"endpoint_url": "http://h:9", "region_name": "eu"}}
    assert storage.s3_options_from_env({"AWS_PROFILE": "p"}, region="us") == {
        "client_kwargs": {"region_name": "us"}, "profile": "p"}
    with pytest.raises(ValueError, match="must be set together"):
        storage.s3_options_from_env({"AWS_ACCESS_KEY_ID": "k"})


def test_s3_through_a_local_server_with_explicit_credentials(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        so = storage.s3_options(endpoint_url=f"http://{host}:{port}", key="testing", secret="testing")
        fs, path = storage.filesystem("s3://bucket/x", so)
        assert path == "bucket/x" and fs.key == "testing" and fs.secret == "testing"
        fs.mkdir("bucket")
        base = "s3://bucket/run/"
        uri = storage.join(base, "/export/", "config.json")
        assert uri == "s3://bucket/run/export/config.json" and storage.is_remote(uri)
        assert not storage.exists(uri, so) and storage.listdir(storage.join(base, "export"), so) == []
        storage.write_json(uri, {"image_size": 64}, so)
        storage.write_bytes(storage.join(base, "export", "model.safetensors"), b"weights", so)
        assert storage.read_json(uri, so) == {"image_size": 64} and storage.exists(uri, so)
        assert storage.listdir(storage.join(base, "export"), so) == ["config.json", "model.safetensors"]
        local = storage.local_copy(storage.join(base, "export"), so, cache_dir=str(tmp_path))
        assert sorted(os.listdir(local)) == ["config.json", "model.safetensors"]
        assert json.loads(open(os.path.join(local, "config.json")).read()) == {"image_size": 64}
        assert storage.local_copy(storage.join(base, "export"), so, cache_dir=str(tmp_path)) == local  # cached
        storage.write_bytes(storage.join(base, "export", "model.safetensors"), b"new weights", so)
        fresh = storage.local_copy(storage.join(base, "export"), so, cache_dir=str(tmp_path))
        assert fresh != local and open(os.path.join(fresh, "model.safetensors"), "rb").read() == b"new weights"
        afs, apath = storage.arrow_filesystem(uri, so)
        with afs.open_input_stream(apath) as f:
            assert json.loads(f.read()) == {"image_size": 64}
        gone = storage.join(base, "export", "model.safetensors")
        storage.remove(gone, so)
        storage.remove(gone, so)  # already gone: fine
        assert storage.listdir(storage.join(base, "export"), so) == ["config.json"]
    finally:
        server.stop()

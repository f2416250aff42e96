"""model.* checks on real GGUF files (written by the reference ``gguf`` package)."""

from __future__ import annotations

import struct
from pathlib import Path

from tests.support.doctor_env import diagnose, write_gguf


def test_no_model_is_skipped(home: Path) -> None:
    report = diagnose(home)
    assert report.check("model.file").status == "skip"
    assert "no model configured" in report.check("model.file").summary


def test_missing_model_fails(home: Path, tmp_path: Path) -> None:
    check = diagnose(home, model=tmp_path / "models" / "absent.gguf").check("model.file")
    assert check.status == "fail"
    assert "absent.gguf does not exist" in check.summary
    assert check.fix and "--model" in check.fix


def test_model_that_is_not_gguf_fails(home: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_text("<html>404 Not Found</html>")
    check = diagnose(home, model=model).check("model.file")
    assert check.status == "fail"
    assert "is not a GGUF file" in check.summary


def test_truncated_model_fails_with_expected_and_actual_size(home: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "model.gguf", n_embd=256)
    full = model.stat().st_size
    with model.open("r+b") as fh:
        fh.truncate(full - 1000)
    check = diagnose(home, model=model).check("model.file")
    assert check.status == "fail"
    assert "truncated" in check.summary
    assert f"the file has {full - 1000}" in check.summary
    assert "needs at least" in check.summary


def test_model_cut_inside_its_header_fails(home: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "model.gguf")
    with model.open("r+b") as fh:
        fh.truncate(40)
    check = diagnose(home, model=model).check("model.file")
    assert check.status == "fail"
    assert "truncated" in check.summary


def test_whole_gguf_model_passes(home: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "model.gguf")
    check = diagnose(home, model=model).check("model.file")
    assert check.status == "ok"
    assert "GGUF v3, llama, 2 tensors" in check.summary


def test_model_with_an_unknown_tensor_type_warns(home: Path, tmp_path: Path) -> None:
    model = write_gguf(tmp_path / "model.gguf", n_tensors=1)
    data = bytearray(model.read_bytes())
    # The tensor info ends with: u32 n_dims=2, u64 dims, u32 type (F32 = 0), u64 offset 0.
    name = b"blk.0.weight"
    at = data.index(name) + len(name) + 4 + 16
    assert struct.unpack_from("<I", data, at)[0] == 0
    struct.pack_into("<I", data, at, 250)
    model.write_bytes(bytes(data))
    check = diagnose(home, model=model).check("model.file")
    assert check.status == "warn"
    assert "250" in check.summary and "cannot be checked" in check.summary


def test_template_checks_are_skipped_honestly(home: Path) -> None:
    without = diagnose(home)
    assert without.check("model.template").summary == (
        "no model configured: run and ask use the built-in demo model"
    )
    with_template = diagnose(home, template="llama-3-chat")
    for check_id in ("model.template", "model.stop_tokens"):
        check = with_template.check(check_id)
        assert check.status == "skip"
        assert "no model configured" in check.summary

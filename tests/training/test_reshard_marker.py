"""training/reshard.py without training: when a checkpoint needs converting, when a converted one counts as there
(its marker, every listed file at its size: a conversion cut off is done again), and a checkpoint the converter
cannot read is a storage error saying how to go on."""
import json

import pytest

from core.errors import StorageError
from training import reshard


def test_a_checkpoint_needs_converting_for_another_worker_count_or_stage():
    saved = {"workers": 2, "zero_stage": 3}
    assert not reshard.needs_universal(saved, 2, 3)
    assert reshard.needs_universal(saved, 1, 3) and reshard.needs_universal(saved, 3, 3)
    assert reshard.needs_universal(saved, 2, 1)


def test_a_converted_checkpoint_counts_only_whole(tmp_path):
    checkpoint = tmp_path / "checkpoint_x"
    universal = checkpoint / reshard.UNIVERSAL_DIR
    (universal / "state" / "zero" / "w").mkdir(parents=True)
    (universal / "state" / "zero" / "w" / "fp32.pt").write_bytes(b"x" * 10)
    assert not reshard.universal_complete(str(checkpoint))  # no marker: cut off before the end
    marker = universal / reshard.UNIVERSAL_MARKER
    marker.write_text(json.dumps({"files": {"state/zero/w/fp32.pt": 10, "state/zero/w/exp_avg.pt": 10}}))
    assert not reshard.universal_complete(str(checkpoint))  # a listed file missing
    (universal / "state" / "zero" / "w" / "exp_avg.pt").write_bytes(b"x" * 9)
    assert not reshard.universal_complete(str(checkpoint))  # truncated
    (universal / "state" / "zero" / "w" / "exp_avg.pt").write_bytes(b"x" * 10)
    assert reshard.universal_complete(str(checkpoint))
    said = []
    assert reshard.convert_to_universal(str(checkpoint), said.append) == str(universal)  # reused, not redone
    assert said == [f"resharding: reusing the universal checkpoint {universal}"]


def test_a_checkpoint_the_converter_cannot_read_is_a_storage_error(tmp_path):
    checkpoint = tmp_path / "checkpoint_y"
    (checkpoint / "state").mkdir(parents=True)
    (checkpoint / "state" / "notes.txt").write_text("no DeepSpeed files here")
    with pytest.raises(StorageError) as err:
        reshard.convert_to_universal(str(checkpoint), lambda line: None)
    assert "could not convert" in err.value.what and "ds_to_universal failed" in err.value.why
    assert "--replicas" in err.value.fix
    assert not reshard.universal_complete(str(checkpoint))

from core import startup_trace


def test_marks_go_to_the_file_only_when_asked(tmp_path, monkeypatch):
    path = tmp_path / "trace"
    monkeypatch.delenv(startup_trace.ENV, raising=False)
    startup_trace.mark("nowhere")
    assert not path.exists()
    monkeypatch.setenv(startup_trace.ENV, str(path))
    startup_trace.mark("cluster up")
    startup_trace.mark("worker: model loaded")
    rows = startup_trace.read_trace(str(path), since=0.0)
    assert [label for _, _, label in rows] == ["cluster up", "worker: model loaded"]


def test_phases_are_the_gaps_between_marks():
    rows = [(1.5, 1, "a"), (4.0, 1, "b"), (4.25, 2, "c")]
    assert startup_trace.phases(rows) == [("a", 1.5), ("b", 2.5), ("c", 0.25)]

"""eval/timing: the busy-CPU warning that train and sweep print before long work."""

from dynprune.eval.timing import busy_cpu_note


def test_busy_cpu_note_warns_only_when_the_cores_are_already_taken():
    assert busy_cpu_note(load=0.5, cores=2) is None and busy_cpu_note(load=1.9, cores=2) is None
    note = busy_cpu_note(load=6.2, cores=2)
    assert note is not None and "load average 6.2 on 2 cores" in note

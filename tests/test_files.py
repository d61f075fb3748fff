"""write_text_atomically under concurrent writers of one path (the workers of a multi-worker run)."""
import os
import threading

from simclr_tf.files import write_text_atomically


def test_concurrent_writers_of_one_file_all_succeed_and_leave_one_whole_file(tmp_path):
    path = str(tmp_path / "flags.json")
    texts = [str(i) * 2000 for i in range(4)]
    errors = []
    start = threading.Barrier(len(texts))

    def writer(text):
        start.wait()
        for _ in range(100):
            try:
                write_text_atomically(path, text)
            except Exception as e:  # collected: an exception in a thread would not fail the test
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["flags.json"]  # no temporary file left behind
    with open(path) as f:
        assert f.read() in texts

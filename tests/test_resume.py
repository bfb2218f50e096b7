"""Resumable collection: SIGKILL mid-job, restart with the same command, same factors."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import curvfast
from curvfast.resume import ResumeError

from tiny_models import lm_batch, make

JOB = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import curvfast
    from tiny_models import lm_batch, make
    ckpt, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def batches():
        for i in range(12):
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally blocks
            yield lm_batch(i)

    fs = curvfast.collect_factors(make("llama"), batches(), fisher="true", seed=3, checkpoint=ckpt,
                                  checkpoint_every=50, progress=False)
    curvfast.save_factors(fs, out)
""")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB.format(tests=os.path.dirname(__file__)))
    ckpt, out = tmp_path / "ckpt.safetensors", tmp_path / "factors.safetensors"
    first = subprocess.run([sys.executable, str(script), str(ckpt), "7", str(out)], capture_output=True)
    assert first.returncode == -9 and ckpt.exists() and not out.exists()
    second = subprocess.run([sys.executable, str(script), str(ckpt), "-1", str(out)], capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert not ckpt.exists()  # removed once the job finished
    resumed = curvfast.load_factors(out)
    full = curvfast.collect_factors(make("llama"), [lm_batch(i) for i in range(12)], fisher="true", seed=3,
                                    progress=False)
    assert resumed.tokens == full.tokens
    for n in full:
        assert torch.allclose(resumed[n].A, full[n].A, rtol=1e-6, atol=0)
        assert torch.allclose(resumed[n].G, full[n].G, rtol=1e-6, atol=1e-12)


def test_checkpoint_of_another_job_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    model = make("llama")

    def interrupted():
        for i in range(6):
            if i == 4:
                raise KeyboardInterrupt
            yield lm_batch(i)

    with pytest.raises(KeyboardInterrupt):
        curvfast.collect_factors(model, interrupted(), fisher="true", seed=1, checkpoint=ckpt, checkpoint_every=1,
                                 progress=False)
    assert ckpt.exists()
    with pytest.raises(ResumeError, match="seed"):
        curvfast.collect_factors(model, [lm_batch(i) for i in range(6)], fisher="true", seed=2, checkpoint=ckpt,
                                 progress=False)
    # Same job resumes and matches an uninterrupted run exactly.
    fs = curvfast.collect_factors(model, [lm_batch(i) for i in range(6)], fisher="true", seed=1, checkpoint=ckpt,
                                  progress=False)
    full = curvfast.collect_factors(model, [lm_batch(i) for i in range(6)], fisher="true", seed=1, progress=False)
    for n in full:
        assert torch.equal(fs[n].G, full[n].G) and torch.equal(fs[n].A, full[n].A)

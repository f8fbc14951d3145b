"""``python keep_states.py STATES ARGS``: ``spider.train`` that also keeps a
copy of every resume state it writes, as ``STATES/step-<k>`` (a run keeps only its latest).

The lockstep checks of ``test_distributed.py`` start another run (2 processes) from the
reference's state after step k, for one step, and compare that step with the reference's.
The copy is taken at the event itself (the write), as ``test_train.py`` does to kill a run.
"""

import shutil
import sys
from pathlib import Path

from spider import rundir, train

states = Path(sys.argv[1])
write = rundir.RunDir.write_resume_state


def write_and_keep(self, state):
    write(self, state)
    shutil.copytree(self.resume_dir, states / f"step-{state.step:06d}", dirs_exist_ok=True)


rundir.RunDir.write_resume_state = write_and_keep
train.main(sys.argv[2:])

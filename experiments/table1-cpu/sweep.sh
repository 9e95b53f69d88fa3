#!/usr/bin/env bash
# How this sweep runs (issue 22): one worker of two, from a worktree pinned at the sweep's commit, one thread each
# (two one-thread runs side by side train ~1.25x faster in total than one two-thread run on 2 cores). Each worker
# takes the next unclaimed run (mkdir is the claim): every method's fold 0, then folds 1-3, then the LOSO runs of
# ours, sepnorm, joint and single (fold 0, A and B held out). A run already finished is skipped, an interrupted one
# resumes from its last checkpoint. Finished records are then copied (without checkpoints) into runs/.
#   git worktree add --detach "$WORKTREE" b650971 && make -C "$WORKTREE" setup
#   WORKTREE=... OUT=... DATA=... CLAIMS=... nohup experiments/table1-cpu/sweep.sh &   (twice)
# The LOSO runs name patients as given (patient_ids=raw), like the Table I records of b650971 (written before
# pseudonyms): these are public datasets, and a pseudonym key outside git would not outlive the machine.
set -u
cd "$WORKTREE"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline
EXPS="single_covidnet single joint_covidnet joint series_adapter parallel_adapter msnet sepnorm ours"
queue() {
  for f in 0 1 2 3; do for e in $EXPS; do echo "t1 $e $f -"; done; done
  for h in A B; do for e in ours sepnorm joint single; do echo "loso $e 0 $h"; done; done
}
queue | while read -r kind e f h; do
  claim=$CLAIMS/$kind-$e-$f-$h
  mkdir -p "$CLAIMS" && mkdir "$claim" 2>/dev/null || continue
  echo "$(date -u +%FT%TZ) start $kind $e fold$f $h"
  common=(experiment="$e" +protocol=cpu fold="$f" seed=643 split_seed=0 data.root="$DATA")
  if [ "$kind" = t1 ]; then
    .venv/bin/python -m covidct.run "${common[@]}" paths.log_dir="$OUT/table1-cpu" > "$claim/out.log" 2>&1
  else
    .venv/bin/python -m covidct.run "${common[@]}" "data.test_sites=[$h]" patient_ids=raw paths.log_dir="$OUT/loso-cpu" \
      > "$claim/out.log" 2>&1
  fi
  echo "$(date -u +%FT%TZ) end $kind $e fold$f $h rc=$?"
done

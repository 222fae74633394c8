"""Tasks as data: prompts, answer tokens and metrics (`decimals`: 9.8 vs 9.11; `ioi`: indirect
object identification; `multiple_choice`: choice tasks); `registry`: a task's name -> its source and
target batches, read by every study."""

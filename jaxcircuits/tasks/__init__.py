"""Tasks as data: prompts, answer tokens and metrics (`decimals`: 9.8 vs 9.11; `ioi`: indirect
object identification)."""

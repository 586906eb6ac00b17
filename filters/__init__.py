"""Keep/drop decisions: each filter returns a Verdict with a reason code."""

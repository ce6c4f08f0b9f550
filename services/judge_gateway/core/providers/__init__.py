"""Judge providers: one adapter per provider API, behind the JudgeProvider port."""

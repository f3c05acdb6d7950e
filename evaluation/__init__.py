"""Offline evaluation: experiments, the baselines' suite, tuning, the prequential replay,
reports and the quick-start train/eval. Nothing on the serving path imports it."""

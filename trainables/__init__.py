"""Ray Tune function trainables, one per task kind."""

"""Host side, plain Python: scheduler, block manager, prefix cache, requests, sequences, beam groups, swap space."""

# pipeloom.parallel

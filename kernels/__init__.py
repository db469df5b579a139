# pipeloom.kernels

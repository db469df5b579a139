# pipeloom.launch

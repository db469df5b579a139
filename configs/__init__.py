# pipeloom.configs

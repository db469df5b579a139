# pipeloom.models

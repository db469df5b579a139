# pipeloom.schedules

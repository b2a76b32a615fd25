// The pod sandbox ("pause") program of the real-node test bed: no dependencies.
module gps-testbed/pause

go 1.26.0

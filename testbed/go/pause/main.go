// Command pause is the pod sandbox process of the real-node test bed's pause
// image: as PID 1 of a pod it holds the pod's namespaces, reaps any child that
// is re-parented to it, and exits 0 on SIGINT or SIGTERM (like Kubernetes'
// own pause). Built static (CGO_ENABLED=0) so the image needs no libc.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause gps-testbed 1")
		return
	}
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig == syscall.SIGCHLD {
			for {
				var status syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}

package virtio

// Worker runs a device's queue processing on its own goroutine so that
// Notify, called on a vCPU thread, only has to post a wake-up.
type Worker struct {
	kick chan struct{}
	stop chan struct{}
	done chan struct{}
}

// StartWorker starts a goroutine that calls fn once per batch of kicks.
// fn must drain whatever work is pending: kicks that arrive while fn runs
// are coalesced into one more call.
func StartWorker(fn func()) *Worker {
	w := &Worker{kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for {
			select {
			case <-w.stop:
				return
			case <-w.kick:
				fn()
			}
		}
	}()
	return w
}

// Kick schedules a call of fn without blocking.
func (w *Worker) Kick() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Stop ends the goroutine after any running fn returns and waits for it.
func (w *Worker) Stop() {
	close(w.stop)
	<-w.done
}

package vmtest

import (
	"strconv"
	"strings"
)

// consoleEvent is what one line of the guest's serial console means.
type consoleEvent int

const (
	eventOutput   consoleEvent = iota // text: boot noise or the command's output
	eventStart                        // the guest command starts now
	eventExit                         // the guest command exited with Status
	eventInitFail                     // the guest init gave up; text says why
)

// consoleLine is the meaning of one console line.
type consoleLine struct {
	Event  consoleEvent
	Text   string // output text (for eventOutput) or the init failure reason
	Status int    // exit status for eventExit
}

// parseConsoleLine interprets one line (without its newline) of the serial
// console. It strips the carriage returns the tty adds and anything before a
// clear-screen escape (the firmware shares the first line with the kernel).
// A marker may follow unterminated command output on the same line; then
// the output comes first and the marker second.
func parseConsoleLine(nonce, line string) []consoleLine {
	line = strings.ReplaceAll(line, "\r", "")
	if i := strings.LastIndex(line, "\x1b[2J"); i >= 0 {
		line = line[i+len("\x1b[2J"):]
	}
	if nonce == "" {
		return []consoleLine{{Event: eventOutput, Text: line}}
	}
	prefix := markerPrefix(nonce)
	i := strings.Index(line, prefix)
	if i < 0 || !strings.HasSuffix(line, ">>") || i+len(prefix) > len(line)-2 {
		return []consoleLine{{Event: eventOutput, Text: line}}
	}
	body := line[i+len(prefix) : len(line)-2]
	var ev consoleLine
	switch {
	case body == "start":
		ev.Event = eventStart
	case strings.HasPrefix(body, "exit="):
		n, err := strconv.Atoi(body[len("exit="):])
		if err != nil || n < 0 || n > 255 {
			return []consoleLine{{Event: eventOutput, Text: line}}
		}
		ev = consoleLine{Event: eventExit, Status: n}
	case strings.HasPrefix(body, "initfail="):
		ev = consoleLine{Event: eventInitFail, Text: body[len("initfail="):]}
	default:
		return []consoleLine{{Event: eventOutput, Text: line}}
	}
	if i == 0 {
		return []consoleLine{ev}
	}
	return []consoleLine{{Event: eventOutput, Text: line[:i]}, ev}
}

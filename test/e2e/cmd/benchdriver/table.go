package main

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// table is one printed result: a title, aligned columns, notes below.
type table struct {
	title  string
	header []string
	rows   [][]string
	notes  []string
}

func (t table) String() string {
	width := make([]int, len(t.header))
	for _, r := range append([][]string{t.header}, t.rows...) {
		for i, c := range r {
			width[i] = max(width[i], len([]rune(c)))
		}
	}
	var sb strings.Builder
	sb.WriteString(t.title + "\n")
	line := func(r []string) {
		for i, c := range r {
			pad := strings.Repeat(" ", width[i]-len([]rune(c)))
			if i == 0 {
				sb.WriteString(c + pad) // labels left, numbers right
			} else {
				sb.WriteString("  " + pad + c)
			}
		}
		sb.WriteString("\n")
	}
	line(t.header)
	for _, r := range t.rows {
		line(r)
	}
	for _, n := range t.notes {
		sb.WriteString("  " + n + "\n")
	}
	return sb.String()
}

// num formats v with prec decimals; NaN (nothing measured) is "n/a".
func num(v float64, prec int) string {
	if math.IsNaN(v) {
		return "n/a"
	}
	s := fmt.Sprintf("%.*f", prec, v)
	if strings.Trim(s, "-0.") == "" {
		return strings.TrimPrefix(s, "-") // a small decrease, not "-0.00"
	}
	return s
}

// ratio formats a/b as "1.23x".
func ratio(a, b float64) string {
	if math.IsNaN(a) || math.IsNaN(b) || b <= 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

// ms formats a duration in milliseconds; a negative one (nothing
// measured) is "n/a".
func ms(d time.Duration) string {
	if d < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond))
}

// medianFloat is the median (the mean of the middle two for an even
// count); NaN for none.
func medianFloat(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// medianOf is the median of f over rs.
func medianOf(rs []fioResult, f func(fioResult) float64) float64 {
	v := make([]float64, len(rs))
	for i, r := range rs {
		v[i] = f(r)
	}
	return medianFloat(v)
}

func seconds(ds []time.Duration) []float64 {
	v := make([]float64, len(ds))
	for i, d := range ds {
		v[i] = d.Seconds()
	}
	return v
}

func fromSeconds(s float64) time.Duration {
	if math.IsNaN(s) {
		return -1
	}
	return time.Duration(s * float64(time.Second))
}

// median, maxOf and minOf are -1 for no durations.
func median(ds []time.Duration) time.Duration { return fromSeconds(medianFloat(seconds(ds))) }

func maxOf(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return -1
	}
	return slices.Max(ds)
}

func minOf(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return -1
	}
	return slices.Min(ds)
}

package policies

import (
	"fmt"
	"reflect"
	"slices"
	"strings"
)

// The TOML schema of a policy file. Every leaf is an opt so that a value of
// the wrong type is recorded (with its line, found later) instead of
// aborting the decoder: `hpcvm policy check` lists every problem at once.

// fileDoc is one policy file.
type fileDoc struct {
	Site     siteDoc   `toml:"site"`
	Defaults *bodyDoc  `toml:"defaults"`
	Rules    []ruleDoc `toml:"rule"`
}

// siteDoc describes the cluster, so check can flag matchers on partitions
// or QoS that do not exist.
type siteDoc struct {
	Partitions opt[[]string] `toml:"partitions"`
	QOS        opt[[]string] `toml:"qos"`
}

type ruleDoc struct {
	Name   opt[string] `toml:"name"`
	Match  matchDoc    `toml:"match"`
	Except matchDoc    `toml:"except"`
	bodyDoc
}

// matchDoc selects jobs. Each key takes a name or a list of globs; a job
// matches a key if it matches any of them, and a rule if it matches every
// key given.
type matchDoc struct {
	Partition opt[[]string] `toml:"partition"`
	Account   opt[[]string] `toml:"account"`
	QOS       opt[[]string] `toml:"qos"`
	User      opt[[]string] `toml:"user"`
	Group     opt[[]string] `toml:"group"`
}

// bodyDoc is what a rule or the defaults table sets.
type bodyDoc struct {
	Images     imagesDoc     `toml:"images"`
	Limits     limitsDoc     `toml:"limits"`
	Checkpoint checkpointDoc `toml:"checkpoint"`
	Migration  migrationDoc  `toml:"migration"`
	Cgroup     cgroupDoc     `toml:"cgroup"`
	Override   opt[[]string] `toml:"user_may_override"`
}

type imagesDoc struct {
	Allow opt[[]string] `toml:"allow"`
	Deny  opt[[]string] `toml:"deny"`
}

type limitsDoc struct {
	MaxNodes           opt[int64] `toml:"max_nodes"`
	MaxCPUsPerNode     opt[int64] `toml:"max_cpus_per_node"`
	MaxCPUsPerJob      opt[int64] `toml:"max_cpus_per_job"`
	MaxMemPerNode      opt[Size]  `toml:"max_mem_per_node"`
	MaxMemPerJob       opt[Size]  `toml:"max_mem_per_job"`
	DefaultCPUsPerNode opt[int64] `toml:"default_cpus_per_node"`
	DefaultMemPerNode  opt[Size]  `toml:"default_mem_per_node"`
	VMMReservePerNode  opt[Size]  `toml:"vmm_mem_reserve_per_node"`
}

type checkpointDoc struct {
	Interval       opt[offDuration] `toml:"interval"`
	MinInterval    opt[Duration]    `toml:"min_interval"`
	BeforeWalltime opt[offDuration] `toml:"before_walltime"`
	Dir            opt[string]      `toml:"dir"`
	Keep           opt[int64]       `toml:"keep"`
	MaxSize        opt[Size]        `toml:"max_size"`
}

type migrationDoc struct {
	Enabled       opt[bool]     `toml:"enabled"`
	Predictors    opt[[]string] `toml:"predictors"`
	RiskThreshold opt[float64]  `toml:"risk_threshold"`
	SpareNodes    opt[int64]    `toml:"spare_nodes"`
}

type cgroupDoc struct {
	CPUWeight       opt[int64] `toml:"cpu_weight"`
	CPUQuotaPercent opt[int64] `toml:"cpu_quota_percent"`
	MemoryMax       opt[Size]  `toml:"memory_max"`
	MemoryHigh      opt[Size]  `toml:"memory_high"`
	PidsMax         opt[int64] `toml:"pids_max"`
	IOWeight        opt[int64] `toml:"io_weight"`
}

// offDuration is a Duration that may also be written "off" (meaning 0), so
// a more specific rule can switch off what a broader one required.
type offDuration Duration

// optBase is the part of an opt that does not depend on its type.
type optBase struct {
	set  bool
	line int
	err  error // the value had the wrong type or did not parse
}

func (o *optBase) base() *optBase { return o }

// opt is one setting as written in a file: whether it was given, where, and
// its value.
type opt[T any] struct {
	optBase
	v T
}

type optField interface{ base() *optBase }

// UnmarshalTOML converts a decoded TOML value. It never fails: conversion
// errors are kept for validation, which knows the key's line.
func (o *opt[T]) UnmarshalTOML(data any) error {
	o.set = true
	o.err = o.convert(data)
	return nil
}

func (o *opt[T]) convert(data any) error {
	switch p := any(&o.v).(type) {
	case *string:
		s, ok := data.(string)
		if !ok {
			return wantType("a string", data)
		}
		*p = s
	case *bool:
		b, ok := data.(bool)
		if !ok {
			return wantType("true or false", data)
		}
		*p = b
	case *int64:
		n, ok := data.(int64)
		if !ok {
			return wantType("an integer", data)
		}
		if !fitsInt(n) {
			return fmt.Errorf("%d is out of range", n)
		}
		*p = n
	case *float64:
		switch x := data.(type) {
		case float64:
			*p = x
		case int64:
			*p = float64(x)
		default:
			return wantType("a number", data)
		}
	case *[]string:
		switch x := data.(type) {
		case string:
			*p = []string{x}
		case []any:
			out := make([]string, 0, len(x))
			for i, e := range x {
				s, ok := e.(string)
				if !ok {
					return fmt.Errorf("element %d: %w", i+1, wantType("a string", e))
				}
				out = append(out, s)
			}
			*p = out
		default:
			return wantType("a string or a list of strings", data)
		}
	case *Size:
		s, ok := data.(string)
		if !ok {
			if n, isInt := data.(int64); isInt && n == 0 {
				*p = 0
				return nil
			}
			return wantType(`a size in quotes, e.g. "16GiB"`, data)
		}
		v, err := ParseSize(s)
		if err != nil {
			return err
		}
		*p = v
	case *Duration:
		s, ok := data.(string)
		if !ok {
			return wantType(`a duration in quotes, e.g. "30m"`, data)
		}
		v, err := ParseDuration(s)
		if err != nil {
			return err
		}
		*p = v
	case *offDuration:
		switch x := data.(type) {
		case string:
			v, err := parseSwitchDuration(x)
			if err != nil {
				return err
			}
			*p = offDuration(v)
		case bool:
			if x {
				return fmt.Errorf("true is not a duration; give one in quotes, e.g. \"30m\"")
			}
			*p = 0
		default:
			return wantType(`a duration in quotes, e.g. "30m", or "off"`, data)
		}
	default:
		panic(fmt.Sprintf("policies: opt of unsupported type %T", o.v))
	}
	return nil
}

func wantType(want string, got any) error {
	return fmt.Errorf("want %s, got %s", want, tomlType(got))
}

// tomlType names a decoded TOML value's type as the TOML spec does.
func tomlType(v any) string {
	switch x := v.(type) {
	case string:
		return fmt.Sprintf("string %q", x)
	case int64:
		return fmt.Sprintf("integer %d", x)
	case float64:
		return fmt.Sprintf("float %v", x)
	case bool:
		return fmt.Sprintf("boolean %v", x)
	case []any:
		return "array"
	case map[string]any, []map[string]any:
		return "table"
	}
	return fmt.Sprintf("%T", v) // dates and times
}

// fieldRef is one leaf of a decoded document.
type fieldRef struct {
	key string // dotted key inside its table, e.g. "limits.max_nodes"
	opt *optBase
}

// leafIndex locates one opt inside a doc struct type.
type leafIndex struct {
	key   string
	index []int
}

var optFieldType = reflect.TypeFor[optField]()

// leafIndexes lists the opts of a doc struct type with their dotted keys.
// Computing this once per type and then indexing keeps reflection out of
// the per-rule path.
func leafIndexes(t reflect.Type) []leafIndex {
	var out []leafIndex
	var walk func(t reflect.Type, prefix string, index []int)
	walk = func(t reflect.Type, prefix string, index []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			idx := append(slices.Clone(index), i)
			if f.Anonymous {
				walk(f.Type, prefix, idx)
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" {
				continue
			}
			key := join(prefix, name)
			switch {
			case reflect.PointerTo(f.Type).Implements(optFieldType):
				out = append(out, leafIndex{key: key, index: idx})
			case f.Type.Kind() == reflect.Struct:
				walk(f.Type, key, idx)
			}
		}
	}
	walk(t, "", nil)
	return out
}

// leaves lists the opts of the struct v points to.
func leaves(v any, idx []leafIndex) []fieldRef {
	rv := reflect.ValueOf(v).Elem()
	out := make([]fieldRef, len(idx))
	for i, l := range idx {
		out[i] = fieldRef{key: l.key, opt: rv.FieldByIndex(l.index).Addr().Interface().(optField).base()}
	}
	return out
}

// schemaKeys lists every key path a policy file may contain, without
// array indices (as toml.MetaData.Keys spells them), to catch keys that the TOML decoder matched
// case-insensitively ("Max_Nodes").
func schemaKeys() map[string]bool {
	keys := map[string]bool{}
	var add func(t reflect.Type, prefix string)
	add = func(t reflect.Type, prefix string) {
		for i := range t.NumField() {
			f := t.Field(i)
			if f.Anonymous {
				add(f.Type, prefix)
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if name == "" {
				continue
			}
			key := join(prefix, name)
			keys[key] = true
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			switch {
			case reflect.PointerTo(ft).Implements(optFieldType):
			case ft.Kind() == reflect.Struct:
				add(ft, key)
			case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
				add(ft.Elem(), key)
			}
		}
	}
	add(reflect.TypeFor[fileDoc](), "")
	return keys
}

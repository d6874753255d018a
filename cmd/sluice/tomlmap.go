package main

import (
	"fmt"
	"math"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The config file is decoded into generic TOML values first and mapped onto
// the typed config by mapValues, so that one pass reports every problem
// (unknown keys, wrong types, bad durations and sizes) with its key, instead
// of stopping at the first.

// textValue is a config type written as a TOML string, like a duration or a size.
type textValue interface {
	parse(s string) error
}

// Duration is a Go duration string in the config ("30s", "1h30m").
type Duration struct{ time.Duration }

func (d *Duration) parse(s string) error {
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("%q is not a duration like \"30s\" or \"5m\"", s)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration back in the same form.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Size is a byte count in the config: a number, or "64KiB", "256MiB", "1GiB".
type Size struct{ Bytes int64 }

var sizeUnits = []struct {
	suffix string
	mult   int64
}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"B", 1}}

func (z *Size) parse(s string) error {
	t := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range sizeUnits {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseFloat(t, 64)
	if err != nil || n < 0 || math.IsInf(n, 0) || n*float64(mult) > math.MaxInt64/2 {
		return fmt.Errorf("%q is not a size like \"64KiB\", \"256MiB\" or \"1GiB\"", s)
	}
	z.Bytes = int64(n * float64(mult))
	return nil
}

// MarshalText writes the size in the largest exact unit.
func (z Size) MarshalText() ([]byte, error) {
	for _, u := range sizeUnits {
		if u.mult > 1 && z.Bytes != 0 && z.Bytes%u.mult == 0 && (z.Bytes/u.mult < 1024 || u.suffix == "TiB") {
			return []byte(fmt.Sprintf("%d%s", z.Bytes/u.mult, u.suffix)), nil
		}
	}
	return []byte(fmt.Sprintf("%dB", z.Bytes)), nil
}

// Timestamp is an RFC 3339 time, as a TOML datetime or a string.
type Timestamp struct{ time.Time }

func (t *Timestamp) parse(s string) error {
	v, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return fmt.Errorf("%q is not an RFC 3339 time like \"2000-01-01T00:00:00Z\"", s)
	}
	t.Time = v
	return nil
}

// MarshalText writes RFC 3339.
func (t Timestamp) MarshalText() ([]byte, error) { return []byte(t.Format(time.RFC3339)), nil }

var (
	textValueType = reflect.TypeFor[textValue]()
	timeType      = reflect.TypeFor[time.Time]()
)

// mapValues sets dst (a pointer to a struct with toml tags) from src, the
// decoded TOML table. Keys already set in dst stay unless src has them: this
// is how a file layers over its profile. It returns every problem found.
func mapValues(dst any, src map[string]any) []error {
	var errs []error
	mapTable(reflect.ValueOf(dst).Elem(), src, "", &errs)
	sort.Slice(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errs
}

func mapTable(dst reflect.Value, src map[string]any, prefix string, errs *[]error) {
	fields := map[string]reflect.Value{}
	t := dst.Type()
	for i := range t.NumField() {
		tag := t.Field(i).Tag.Get("toml")
		if tag == "" || tag == "-" {
			continue
		}
		fields[tag] = dst.Field(i)
	}
	for key, val := range src {
		path := prefix + key
		f, ok := fields[key]
		if !ok {
			*errs = append(*errs, fmt.Errorf("%s: unknown key", path))
			continue
		}
		mapValue(f, val, path, errs)
	}
}

func mapValue(f reflect.Value, val any, path string, errs *[]error) {
	bad := func(format string, args ...any) {
		*errs = append(*errs, fmt.Errorf("%s: "+format, append([]any{path}, args...)...))
	}
	if f.CanAddr() && f.Addr().Type().Implements(textValueType) {
		var s string
		switch v := val.(type) {
		case string:
			s = v
		case int64:
			s = strconv.FormatInt(v, 10)
		case float64:
			s = strconv.FormatFloat(v, 'f', -1, 64)
		case time.Time:
			s = v.Format(time.RFC3339Nano)
		default:
			bad("expected a string, got %s", tomlType(val))
			return
		}
		if err := f.Addr().Interface().(textValue).parse(s); err != nil {
			bad("%v", err)
		}
		return
	}
	switch f.Kind() {
	case reflect.String:
		s, ok := val.(string)
		if !ok {
			bad("expected a string, got %s", tomlType(val))
			return
		}
		f.SetString(s)
	case reflect.Bool:
		b, ok := val.(bool)
		if !ok {
			bad("expected true or false, got %s", tomlType(val))
			return
		}
		f.SetBool(b)
	case reflect.Int, reflect.Int64, reflect.Uint8:
		n, ok := val.(int64)
		if !ok {
			bad("expected an integer, got %s", tomlType(val))
			return
		}
		if f.OverflowInt(n) || (f.Kind() == reflect.Uint8 && (n < 0 || n > 255)) {
			bad("%d is out of range", n)
			return
		}
		if f.Kind() == reflect.Uint8 {
			f.SetUint(uint64(n))
		} else {
			f.SetInt(n)
		}
	case reflect.Float64:
		switch v := val.(type) {
		case int64:
			f.SetFloat(float64(v))
		case float64:
			f.SetFloat(v)
		default:
			bad("expected a number, got %s", tomlType(val))
		}
	case reflect.Pointer:
		p := reflect.New(f.Type().Elem())
		mapValue(p.Elem(), val, path, errs)
		f.Set(p)
	case reflect.Struct:
		if f.Type() == timeType {
			bad("unsupported field type")
			return
		}
		m, ok := val.(map[string]any)
		if !ok {
			bad("expected a table, got %s", tomlType(val))
			return
		}
		mapTable(f, m, path+".", errs)
	case reflect.Slice:
		items, ok := val.([]map[string]any)
		if !ok {
			if arr, isArr := val.([]any); isArr {
				for _, a := range arr {
					m, isMap := a.(map[string]any)
					if !isMap {
						bad("expected an array of tables ([[%s]]), got %s", path, tomlType(val))
						return
					}
					items = append(items, m)
				}
			} else {
				bad("expected an array of tables ([[%s]]), got %s", path, tomlType(val))
				return
			}
		}
		// An array in a later layer replaces the earlier one whole.
		s := reflect.MakeSlice(f.Type(), len(items), len(items))
		for i, m := range items {
			mapTable(s.Index(i), m, fmt.Sprintf("%s[%d].", path, i), errs)
		}
		f.Set(s)
	default:
		bad("unsupported field type %s", f.Type())
	}
}

func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case time.Time:
		return "a datetime"
	case map[string]any:
		return "a table"
	case []any, []map[string]any:
		return "an array"
	}
	return fmt.Sprintf("%T", v)
}

// errorLines formats problems one per line, as the CLI prints them.
func errorLines(errs []error) string {
	var b strings.Builder
	for _, e := range errs {
		b.WriteString(e.Error())
		b.WriteByte('\n')
	}
	return b.String()
}

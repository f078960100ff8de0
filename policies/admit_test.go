package policies

import (
	"encoding/json"
	"errors"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func loadMerge(t *testing.T) *Policy {
	t.Helper()
	p, err := Load("testdata/merge")
	if err != nil {
		t.Fatal(err)
	}
	if w := p.Warnings(); len(w) != 0 {
		t.Fatalf("unexpected warnings: %v", w)
	}
	return p
}

// base is an ordinary request that the merge policy admits as is.
func base() Request {
	return Request{User: "bob", Groups: []string{"users"}, Account: "proj", Partition: "cpu", QOS: "normal",
		Image: "rocky9", Nodes: 2, CPUsPerNode: 8, MemPerNode: 8 << 30, Walltime: Duration(12 * time.Hour)}
}

func dur(s string) Duration {
	d, err := parseSwitchDuration(s)
	if err != nil {
		panic(err)
	}
	return d
}

func TestAdmitMerge(t *testing.T) {
	p := loadMerge(t)
	type want struct {
		// For an admitted request: settings (by Settings() name) to check,
		// with the rule that must have set each ("" for non-rule origins).
		values map[string]string
		rules  map[string]string
		// For a refusal: the deciding rule, its file and the setting.
		refusedBy, file, setting string
	}
	tests := []struct {
		name string
		edit func(r *Request)
		want want
	}{
		{"defaults apply", func(r *Request) {}, want{
			values: map[string]string{"checkpoint.interval": "1h", "checkpoint.dir": "/ckpt/proj/bob/%j", "migration.enabled": "true",
				"vmm_mem_reserve_per_node": "2GiB", "cgroup.memory_max": "10GiB", "cgroup.pids_max": "4096", "vcpus": "16"},
			rules: map[string]string{"checkpoint.interval": "defaults", "image": "defaults", "cgroup.memory_max": ""}}},
		{"job id expands dir", func(r *Request) { r.JobID = "4242" }, want{values: map[string]string{"checkpoint.dir": "/ckpt/proj/bob/4242"}}},
		{"default memory", func(r *Request) { r.MemPerNode = 0 }, want{
			values: map[string]string{"mem_per_node": "4GiB", "cgroup.memory_max": "6GiB"}, rules: map[string]string{"mem_per_node": "defaults"}}},
		{"cpus spread over nodes", func(r *Request) { r.CPUsPerNode, r.CPUs = 0, 9 }, want{
			values: map[string]string{"vcpus": "9", "vcpus_per_node": "5"}}},

		// Tightening is always allowed.
		{"tighten interval", func(r *Request) { r.CheckpointInterval = OptDuration{true, dur("10m")} }, want{
			values: map[string]string{"checkpoint.interval": "10m"}, rules: map[string]string{"checkpoint.interval": ""}}},
		{"tighten walltime lead", func(r *Request) { r.CheckpointAtWalltime = WalltimeCheckpoint{WishYes, dur("30m")} }, want{
			values: map[string]string{"checkpoint.before_walltime": "30m"}}},
		{"yes keeps the policy lead", func(r *Request) { r.CheckpointAtWalltime = WalltimeCheckpoint{Wish: WishYes} }, want{
			values: map[string]string{"checkpoint.before_walltime": "10m"}, rules: map[string]string{"checkpoint.before_walltime": "defaults"}}},
		{"ask for migration where it is off", func(r *Request) { r.QOS, r.Migration = "debug", WishYes }, want{
			values: map[string]string{"migration.enabled": "true", "migration.predictors": "mce, smart", "checkpoint.interval": "off"}}},

		// Loosening is refused, naming the rule that set the value.
		{"loosen interval", func(r *Request) { r.CheckpointInterval = OptDuration{true, dur("2h")} }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.interval"}},
		{"interval off", func(r *Request) { r.CheckpointInterval = OptDuration{Set: true} }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.interval"}},
		{"loosen gpu interval", func(r *Request) {
			r.Partition, r.Image, r.MemPerNode = "gpu", "rocky9-cuda12", 16<<30
			r.CheckpointInterval = OptDuration{true, dur("45m")}
		}, want{refusedBy: "gpu", file: "00-site.toml", setting: "checkpoint.interval"}},
		{"interval below minimum", func(r *Request) { r.CheckpointInterval = OptDuration{true, dur("1m")} }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.min_interval"}},
		{"no walltime checkpoint", func(r *Request) { r.CheckpointAtWalltime = WalltimeCheckpoint{Wish: WishNo} }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.before_walltime"}},
		{"later walltime checkpoint", func(r *Request) { r.CheckpointAtWalltime = WalltimeCheckpoint{WishYes, dur("5m")} }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.before_walltime"}},
		{"no migration", func(r *Request) { r.Migration = WishNo }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "migration.enabled"}},

		// Overrides only where a rule grants them.
		{"staff may loosen interval", func(r *Request) {
			r.Groups = []string{"users", "hpc-staff"}
			r.CheckpointInterval = OptDuration{true, dur("3h")}
		}, want{values: map[string]string{"checkpoint.interval": "3h"}}},
		{"staff may turn migration off", func(r *Request) { r.Groups, r.Migration = []string{"hpc-staff"}, WishNo }, want{
			values: map[string]string{"migration.enabled": "false"}}},
		{"staff may not skip walltime checkpoint", func(r *Request) {
			r.Groups, r.CheckpointAtWalltime = []string{"hpc-staff"}, WalltimeCheckpoint{Wish: WishNo}
		}, want{refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.before_walltime"}},
		{"debug qos may skip walltime checkpoint", func(r *Request) { r.QOS, r.CheckpointAtWalltime = "debug", WalltimeCheckpoint{Wish: WishNo} }, want{
			values: map[string]string{"checkpoint.before_walltime": "off"}}},
		{"a later file's value is not unlocked by an earlier grant", func(r *Request) {
			r.User, r.Groups = "alice", []string{"hpc-staff"}
			r.CheckpointInterval = OptDuration{true, dur("3h")}
		}, want{refusedBy: "alice", file: "90-local.toml", setting: "checkpoint.interval"}},

		// Precedence across files and matchers.
		{"later file beats defaults", func(r *Request) { r.User = "alice" }, want{
			values: map[string]string{"checkpoint.interval": "2h"}, rules: map[string]string{"checkpoint.interval": "alice"}}},
		{"except excludes", func(r *Request) { r.User, r.Partition, r.Image, r.MemPerNode = "alice", "gpu", "rocky9-cuda12", 16<<30 }, want{
			values: map[string]string{"checkpoint.interval": "30m"}, rules: map[string]string{"checkpoint.interval": "gpu"}}},
		{"partition rule caps memory", func(r *Request) { r.Partition, r.Image, r.MemPerNode = "gpu", "rocky9-cuda12", 64<<30 }, want{
			refusedBy: "gpu", file: "00-site.toml", setting: "limits.max_mem_per_node"}},
		{"more specific rule raises it", func(r *Request) {
			r.Account, r.Partition, r.Image, r.MemPerNode = "bigproj", "gpu", "rocky9-cuda12", 64<<30
		}, want{values: map[string]string{"mem_per_node": "64GiB"}}},
		{"later file lowers it", func(r *Request) { r.Account, r.MemPerNode = "bigproj", 32<<30 }, want{
			refusedBy: "bigproj", file: "20-accounts.toml", setting: "limits.max_mem_per_node"}},

		// Images.
		{"partition allow list replaces the default one", func(r *Request) { r.Partition, r.MemPerNode = "gpu", 16<<30 }, want{
			refusedBy: "gpu", file: "00-site.toml", setting: "images.allow"}},
		{"deny lists add up", func(r *Request) { r.Image = "rocky9-debug" }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "images.deny"}},
		{"account deny", func(r *Request) { r.Account, r.Image = "bigproj", "ubuntu-22.04" }, want{
			refusedBy: "bigproj", file: "20-accounts.toml", setting: "images.deny"}},
		{"image not allowed", func(r *Request) { r.Image = "centos7" }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "images.allow"}},

		// Sizes.
		{"too many nodes", func(r *Request) { r.Nodes = 17 }, want{refusedBy: "defaults", file: "00-site.toml", setting: "limits.max_nodes"}},
		{"too many cpus", func(r *Request) { r.CPUsPerNode = 65 }, want{refusedBy: "defaults", file: "00-site.toml", setting: "limits.max_cpus_per_node"}},
		{"cpus spread still too many", func(r *Request) { r.CPUsPerNode, r.CPUs = 0, 129 }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "limits.max_cpus_per_node"}},
		{"checkpoint too big", func(r *Request) { r.Nodes, r.MemPerNode = 16, 128<<30 }, want{
			refusedBy: "defaults", file: "00-site.toml", setting: "checkpoint.max_size"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := base()
			tt.edit(&req)
			eff, err := p.Admit(req)
			if tt.want.refusedBy != "" {
				var re *RefusedError
				if !errors.As(err, &re) {
					t.Fatalf("Admit = %v, %v; want a refusal by %q", eff, err, tt.want.refusedBy)
				}
				if re.By.Rule != tt.want.refusedBy || filepath.Base(re.By.File) != tt.want.file || re.Setting != tt.want.setting || re.By.Line == 0 {
					t.Errorf("refused by %v on %s; want rule %q in %s on %s", re.By, re.Setting, tt.want.refusedBy, tt.want.file, tt.want.setting)
				}
				msg := err.Error()
				if !strings.Contains(msg, `rule "`+tt.want.refusedBy+`"`) || !strings.Contains(msg, tt.want.file+":") || !strings.Contains(msg, tt.want.setting) {
					t.Errorf("message %q does not name rule, file and setting", msg)
				}
				return
			}
			if err != nil {
				t.Fatalf("Admit: %v", err)
			}
			for k, v := range tt.want.values {
				if got := eff.Value(k); got != v {
					t.Errorf("%s = %q, want %q (from %v)", k, got, v, eff.Provenance[k])
				}
			}
			for k, r := range tt.want.rules {
				if got := eff.Provenance[k].Rule; got != r {
					t.Errorf("%s set by %v, want rule %q", k, eff.Provenance[k], r)
				}
			}
		})
	}
}

func TestRefusalMessage(t *testing.T) {
	p := loadMerge(t)
	req := base()
	req.Partition, req.Image, req.MemPerNode = "gpu", "rocky9-cuda12", 64<<30
	_, err := p.Admit(req)
	want := `hpcvm: request refused by rule "gpu" (testdata/merge/00-site.toml:29): --vm-mem=64GiB exceeds limits.max_mem_per_node = 32GiB`
	if err == nil || err.Error() != want {
		t.Errorf("got  %v\nwant %s", err, want)
	}
}

func TestAdmitReportsEveryRefusal(t *testing.T) {
	p := loadMerge(t)
	req := base()
	req.Image, req.Nodes, req.Migration = "centos7", 20, WishNo
	_, err := p.Admit(req)
	var settings []string
	for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
		var re *RefusedError
		if errors.As(e, &re) {
			settings = append(settings, re.Setting)
		}
	}
	want := []string{"images.allow", "limits.max_nodes", "migration.enabled"}
	if !reflect.DeepEqual(settings, want) {
		t.Errorf("refused settings = %v, want %v\n%v", settings, want, err)
	}
}

func TestAdmitPolicyGaps(t *testing.T) {
	tests := []struct {
		name, policy string
		edit         func(*Request)
		setting      string
		conflict     bool // a *ConflictError rather than a *RefusedError
	}{
		{"no allow list", "[defaults]\nlimits.max_nodes = 4\n", func(*Request) {}, "images.allow", false},
		{"no memory", "[defaults]\nimages.allow = \"*\"\n", func(r *Request) { r.MemPerNode = 0 }, "limits.default_mem_per_node", false},
		{"no checkpoint dir, required", "[defaults]\nimages.allow = \"*\"\ncheckpoint.interval = \"1h\"\n", func(*Request) {}, "checkpoint.dir", true},
		{"no checkpoint dir, asked", "[defaults]\nimages.allow = \"*\"\n", func(r *Request) { r.CheckpointInterval = OptDuration{true, dur("1h")} }, "checkpoint.dir", false},
		{"no predictors, asked", "[defaults]\nimages.allow = \"*\"\n", func(r *Request) { r.Migration = WishYes }, "migration.predictors", false},
		{"interval below another rule's minimum", "[defaults]\nimages.allow = \"*\"\ncheckpoint = { min_interval = \"1h\", dir = \"/c\" }\n[[rule]]\nname = \"often\"\nmatch.user = \"bob\"\ncheckpoint.interval = \"10m\"\n",
			func(*Request) {}, "checkpoint.min_interval", true},
		{"cgroup too small for the VM", "[defaults]\nimages.allow = \"*\"\ncgroup.memory_max = \"8GiB\"\n", func(*Request) {}, "cgroup.memory_max", false},
		{"default mem above max", "[defaults]\nimages.allow = \"*\"\nlimits.default_mem_per_node = \"8GiB\"\n[[rule]]\nname = \"small\"\nmatch.user = \"bob\"\nlimits.max_mem_per_node = \"4GiB\"\n",
			func(r *Request) { r.MemPerNode = 0 }, "limits.max_mem_per_node", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := Parse(File{Name: "p.toml", Data: []byte(tt.policy)})
			if err != nil {
				t.Fatal(err)
			}
			req := base()
			tt.edit(&req)
			_, err = p.Admit(req)
			var re *RefusedError
			var ce *ConflictError
			switch {
			case tt.conflict && errors.As(err, &ce):
				if ce.Setting != tt.setting || !strings.Contains(err.Error(), "administrators") {
					t.Errorf("conflict on %q: %v; want %q", ce.Setting, err, tt.setting)
				}
			case !tt.conflict && errors.As(err, &re):
				if re.Setting != tt.setting || !strings.Contains(err.Error(), tt.setting) {
					t.Errorf("refusal on %q: %v; want %q", re.Setting, err, tt.setting)
				}
			default:
				t.Errorf("Admit error = %v; want conflict=%v on %s", err, tt.conflict, tt.setting)
			}
		})
	}
}

func TestRequestErrors(t *testing.T) {
	p := loadMerge(t)
	tests := []struct {
		name  string
		edit  func(*Request)
		field string
	}{
		{"no user", func(r *Request) { r.User = "" }, "user"},
		{"no image", func(r *Request) { r.Image = "" }, optImage},
		{"space in image", func(r *Request) { r.Image = "rocky 9" }, optImage},
		{"negative nodes", func(r *Request) { r.Nodes = -1 }, optNodes},
		{"cpus do not fit", func(r *Request) { r.CPUs = 40 }, optCPUs},
		{"cpus leave a node empty", func(r *Request) { r.CPUs = 8 }, optCPUs},
		{"fewer cpus than nodes", func(r *Request) { r.CPUsPerNode, r.CPUs, r.Nodes = 0, 3, 4 }, optCPUs},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := base()
			tt.edit(&req)
			_, err := p.Admit(req)
			var re *RequestError
			if !errors.As(err, &re) || re.Field != tt.field {
				t.Errorf("Admit error = %v; want a RequestError on %s", err, tt.field)
			}
		})
	}
}

func TestRequestJSON(t *testing.T) {
	in := `{"job_id":"77","user":"bob","groups":["users"],"account":"proj","partition":"cpu","qos":"normal",
		"image":"rocky9","nodes":2,"cpus":16,"cpus_per_node":8,"mem_per_node":"8G","walltime":"12h",
		"checkpoint_interval":"off","checkpoint_at_walltime":"15m","migration":true}`
	var r Request
	if err := json.Unmarshal([]byte(in), &r); err != nil {
		t.Fatal(err)
	}
	want := Request{JobID: "77", User: "bob", Groups: []string{"users"}, Account: "proj", Partition: "cpu", QOS: "normal",
		Image: "rocky9", Nodes: 2, CPUs: 16, CPUsPerNode: 8, MemPerNode: 8 << 30, Walltime: Duration(12 * time.Hour),
		CheckpointInterval: OptDuration{Set: true}, CheckpointAtWalltime: WalltimeCheckpoint{WishYes, dur("15m")}, Migration: WishYes}
	if !reflect.DeepEqual(r, want) {
		t.Errorf("decoded %+v\nwant    %+v", r, want)
	}
	out, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var back Request
	if err := json.Unmarshal(out, &back); err != nil || !reflect.DeepEqual(back, want) {
		t.Errorf("round trip via %s = %+v, %v", out, back, err)
	}
	for _, bad := range []string{`{"mem_per_node":"8GB"}`, `{"walltime":"600"}`, `{"migration":"maybe"}`, `{"checkpoint_at_walltime":3}`} {
		if err := json.Unmarshal([]byte(bad), &r); err == nil {
			t.Errorf("Unmarshal(%s) succeeded", bad)
		}
	}
}

func TestEffectiveJSONRoundTrip(t *testing.T) {
	p := loadMerge(t)
	req := base()
	req.JobID = "9"
	eff, err := p.Admit(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(eff)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	if raw["mem_per_node_bytes"] != float64(8<<30) || raw["checkpoint"].(map[string]any)["interval_seconds"] != float64(3600) {
		t.Errorf("wire form lacks byte/second fields: %s", b)
	}
	var back Effective
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	eff.Warnings = []string{}
	if !reflect.DeepEqual(&back, eff) {
		t.Errorf("round trip:\n got %+v\nwant %+v", back, *eff)
	}
}

func TestExpandDir(t *testing.T) {
	req := &Request{User: "u", Account: "a", Partition: "p"}
	if got := expandDir("/c/%a/%u", &Request{User: "u"}); got != "/c/_/u" {
		t.Errorf("missing account expands to %q, want /c/_/u", got)
	}
	tests := []struct{ dir, job, want string }{
		{"/c/%u/%a/%p/%j", "", "/c/u/a/p/%j"},
		{"/c/%u/%j", "12", "/c/u/12"},
		{"/c/100%%/%j", "12", "/c/100%/12"},
		{"/c/100%%/%j", "", "/c/100%%/%j"},
		{"/plain", "", "/plain"},
	}
	for _, tt := range tests {
		req.JobID = tt.job
		if got := expandDir(tt.dir, req); got != tt.want {
			t.Errorf("expandDir(%q, job %q) = %q, want %q", tt.dir, tt.job, got, tt.want)
		}
	}
}

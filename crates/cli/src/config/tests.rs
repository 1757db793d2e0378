use super::*;
use crate::agent::AgentOptions;
use crate::coordinator::CoordinatorOptions;

/// The options and matches of `argv` (without the subcommand's name).
fn cli<T: ConfigFile>(argv: &[&str]) -> (T, ArgMatches) {
    let cmd = T::augment_args(clap::Command::new("daemon").no_binary_name(true));
    let matches = cmd.try_get_matches_from(argv).unwrap();
    (T::from_arg_matches(&matches).unwrap(), matches)
}

fn table<T: Serialize>(v: &T) -> toml::Table {
    toml::Table::try_from(v).unwrap()
}

/// Every option away from its default, on the command line.
const AGENT_ARGS: &[&str] = &[
    "--coordinator=https://10.0.0.1:7600,https://10.0.0.2:7600",
    "--data-dir=/srv/virtman",
    "--listen=0.0.0.0:10811",
    "--advertise=10.0.0.5:10811",
    "--cache-size=50G",
    "--commit-interval=250ms",
    "--token-file=/etc/virtman/token",
    "--labels=rack=r1,zone=z2",
    "--name=host7",
    "--image-store=/srv/images",
    "--link-delay=0.2ms",
    "--hedge-ceiling=1s",
    "--no-hedge",
    "--prefetch-in-flight=8",
    "--upload-rate=500M",
    "--download-rate=60MB/s",
    "--tls=/etc/virtman/tls",
    "--socket-group=libvirt-qemu",
];

#[test]
fn agent_options_print_and_load_back_to_the_same() {
    let (opts, _) = cli::<AgentOptions>(AGENT_ARGS);
    let text = render(&opts, false).unwrap();
    let back: AgentOptions = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(table(&back), table(&opts), "{text}");
    assert_eq!(render(&back, false).unwrap(), text);
    assert!(text.contains("cache_size = \"50G\"\n"), "{text}");
    assert!(text.contains("link_delay = \"0.2ms\"\n"), "{text}");
    // The defaults too: options not set are written commented out.
    let defaults = AgentOptions::default();
    let text = render(&defaults, false).unwrap();
    assert!(text.contains("# advertise = \"HOST:PORT\"\n"), "{text}");
    let back: AgentOptions = parse(&text).unwrap();
    assert_eq!(table(&back), table(&defaults));
}

#[test]
fn coordinator_options_print_and_load_back_to_the_same() {
    let (opts, _) = cli::<CoordinatorOptions>(&[
        "--listen=[::]:7601",
        "--data-dir=/var/lib/virtman/coordinator",
        "--token-file=/etc/virtman/token",
        "--fanout=8",
        "--origin-fanout=2",
        "--parents=3",
        "--heartbeat-interval=500ms",
        "--heartbeat-timeout=3s",
        "--etcd=http://10.0.0.1:2379,http://10.0.0.2:2379",
        "--etcd-prefix=/vm",
        "--lease-ttl=5s",
        "--name=c1",
        "--advertise=http://10.0.0.5:7601",
    ]);
    let text = render(&opts, false).unwrap();
    let back: CoordinatorOptions = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(table(&back), table(&opts), "{text}");
    assert_eq!(render(&back, false).unwrap(), text);
    assert!(text.contains("fanout = 8\n"), "{text}");
    assert!(
        text.contains("etcd = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]\n"),
        "{text}"
    );
}

#[test]
fn the_example_comments_out_the_defaults_and_loads_to_them() {
    let (opts, _) = cli::<AgentOptions>(&[]);
    let text = render(&opts, true).unwrap();
    assert!(text.contains("# cache_size = \"10G\"\n"), "{text}");
    assert!(
        !text.lines().any(|l| !l.is_empty() && !l.starts_with('#')),
        "every line is a comment: {text}"
    );
    let back: AgentOptions = parse(&text).unwrap();
    assert_eq!(table(&back), table(&AgentOptions::default()));
    // A value away from its default stays uncommented.
    let (opts, _) = cli::<CoordinatorOptions>(&["--data-dir", "/var/lib/virtman/coordinator"]);
    let text = render(&opts, true).unwrap();
    assert!(
        text.contains("\ndata_dir = \"/var/lib/virtman/coordinator\"\n"),
        "{text}"
    );
}

#[test]
fn flags_given_override_the_file_and_the_rest_comes_from_it() {
    let file: AgentOptions = parse(
        "cache_size = \"5G\"\nlisten = \"0.0.0.0:10900\"\nlabels = [\"rack=r1\"]\nno_hedge = true\n",
    )
    .unwrap();
    let (given, matches) = cli::<AgentOptions>(&["--cache-size", "20G", "--labels", "rack=r9"]);
    let eff = effective(given, &matches, Some(file)).unwrap();
    assert_eq!(eff.cache_size, 20 << 30, "the flag wins");
    assert_eq!(eff.labels, ["rack=r9"], "the flag wins");
    assert_eq!(eff.listen, "0.0.0.0:10900", "from the file");
    assert!(eff.no_hedge, "from the file");
    assert_eq!(
        eff.hedge_ceiling,
        std::time::Duration::from_millis(250),
        "default"
    );
    // A flag given at its default value still wins over the file.
    let file: AgentOptions = parse("listen = \"0.0.0.0:10900\"\n").unwrap();
    let (given, matches) = cli::<AgentOptions>(&["--listen", "127.0.0.1:10810"]);
    let eff = effective(given, &matches, Some(file)).unwrap();
    assert_eq!(eff.listen, "127.0.0.1:10810");
}

/// The error for `text`, which must be refused.
fn refusal<T: ConfigFile + std::fmt::Debug>(text: &str) -> String {
    parse::<T>(text).expect_err("refused")
}

#[test]
fn bad_files_are_refused_naming_line_and_key() {
    let head = "# agent\ndata_dir = \"/srv/v\"\n";
    let unknown = refusal::<AgentOptions>(&format!("{head}cache_sise = \"10G\"\n"));
    assert!(
        unknown.starts_with("3: key `cache_sise`: unknown field"),
        "{unknown}"
    );
    let wrong = refusal::<AgentOptions>(&format!("{head}\nno_hedge = \"yes\"\n"));
    assert!(
        wrong.starts_with("4: key `no_hedge`: invalid type"),
        "{wrong}"
    );
    let wrong = refusal::<CoordinatorOptions>("fanout = \"eight\"\n");
    assert!(
        wrong.starts_with("1: key `fanout`: invalid type"),
        "{wrong}"
    );
    let zero = refusal::<AgentOptions>("prefetch_in_flight = 0\n");
    assert!(
        zero.starts_with("1: key `prefetch_in_flight`: 0 is out of range (1 to 64)"),
        "{zero}"
    );
    let file: AgentOptions = parse("prefetch_in_flight = 8\n").unwrap();
    assert_eq!(file.prefetch_in_flight, 8);
    assert_eq!(AgentOptions::default().prefetch_in_flight, 4);
    let flag = <AgentOptions as clap::Args>::augment_args(
        clap::Command::new("agent").no_binary_name(true),
    )
    .try_get_matches_from(["--prefetch-in-flight", "0"]);
    assert!(flag.is_err(), "--prefetch-in-flight 0 is refused too");
    let negative = refusal::<AgentOptions>(&format!("{head}cache_size = -5\n"));
    assert!(
        negative.starts_with("3: key `cache_size`: a size cannot be negative"),
        "{negative}"
    );
    let negative = refusal::<AgentOptions>("cache_size = \"-5G\"\n");
    assert!(
        negative.starts_with("1: key `cache_size`: a size cannot be negative"),
        "{negative}"
    );
    let listen = refusal::<AgentOptions>(&format!("{head}listen = \"10810\"\n"));
    assert!(
        listen.starts_with("3: key `listen`: \"10810\" is not a listen address"),
        "{listen}"
    );
    let listen = refusal::<CoordinatorOptions>("\n\nlisten = \"0.0.0.0:99999\"\n");
    assert!(listen.starts_with("3: key `listen`:"), "{listen}");
    let duration = refusal::<CoordinatorOptions>("heartbeat_timeout = \"4\"\n");
    assert!(
        duration.starts_with("1: key `heartbeat_timeout`:") && duration.contains("needs a unit"),
        "{duration}"
    );
    let range = refusal::<CoordinatorOptions>("fanout = 4\nparents = 0\n");
    assert!(
        range.starts_with("2: key `parents`: 0 is out of range (1 to 16)"),
        "{range}"
    );
    let range = refusal::<CoordinatorOptions>("fanout = -3\n");
    assert!(
        range.starts_with("1: key `fanout`: -3 is out of range (2 to 1024)"),
        "{range}"
    );
    // A value spread over lines is named by its key.
    let array = refusal::<AgentOptions>("labels = [\n  \"a=b\",\n  3,\n]\n");
    assert!(
        array.starts_with("3: key `labels`: invalid type"),
        "{array}"
    );
}

#[test]
fn a_missing_explicit_file_is_an_error_a_missing_default_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = config_path(Some(&missing), dir.path(), "agent.toml").unwrap_err();
    assert!(e.to_string().contains("nope.toml does not exist"), "{e}");
    assert_eq!(config_path(None, dir.path(), "agent.toml").unwrap(), None);
    std::fs::write(dir.path().join("agent.toml"), "").unwrap();
    assert_eq!(
        config_path(None, dir.path(), "agent.toml").unwrap(),
        Some(dir.path().join("agent.toml"))
    );
}

#[test]
fn a_file_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, "\ncache_size = true\n").unwrap();
    let e = load::<AgentOptions>(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}:2: key `cache_size`: invalid type: boolean",
            path.display()
        )),
        "{e}"
    );
}

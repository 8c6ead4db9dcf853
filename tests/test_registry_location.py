"""Registry locations against the Docker reference grammar.

Our own vectors, covering the ground of the tables in distribution/reference
(``reference_test.go``, ``normalize_test.go``), containers/image
(``docker/reference``) and go-containerregistry (``pkg/name``): hosts, ports,
IPv6, repository components and separators, tags, digests, the 255-character
name limit and the Docker Hub defaults. A URL (``http[s]://``) names its host as
written; anything else is a Docker reference.
"""

from __future__ import annotations

import dataclasses

import pytest

from ocicas import InvalidError, open_registry
from ocicas.cli._locations import Location, parse_location
from ocicas.registry import RegistryLocation, parse_registry_location
from ocicas.registry._location import validate_repository, validate_tag

pytestmark = pytest.mark.anyio

HUB = "https://registry-1.docker.io"
D256 = "sha256:" + "0123456789abcdef" * 4
D512 = "sha512:" + "fedcba9876543210" * 8
TAG128 = "T" + "a.b-c_d" * 18 + "x" * 1  # 1 + 126 + 1 = 128 characters
assert len(TAG128) == 128

# (text, base_url, repository, reference, tag)
VALID: list[tuple[str, str, str, str | None, str | None]] = [
    # -- URLs keep their host as written, Docker Hub is not special --------------------
    ("http://127.0.0.1:5000/team/app", "http://127.0.0.1:5000", "team/app", None, None),
    ("HTTPS://reg.example/a/b/c", "https://reg.example", "a/b/c", None, None),
    ("https://reg.example:443/app@" + D256, "https://reg.example:443", "app", D256, None),
    ("http://[::1]:5000/x_y/z-0.1", "http://[::1]:5000", "x_y/z-0.1", None, None),
    ("http://myhost/app:v1", "http://myhost", "app", "v1", None),
    ("https://docker.io/ubuntu", "https://docker.io", "ubuntu", None, None),
    ("http://host:5000/repo:tag@" + D256, "http://host:5000", "repo", D256, "tag"),
    ("http://host/team/app/", "http://host", "team/app", None, None),
    # -- Docker references: the first component is a host if it has '.' or ':' or is localhost
    ("test.com/repo:tag", "https://test.com", "repo", "tag", None),
    ("test:5000/repo", "https://test:5000", "repo", None, None),
    ("test:5000/repo:tag", "https://test:5000", "repo", "tag", None),
    ("test:5000/repo@" + D256, "https://test:5000", "repo", D256, None),
    ("test:5000/repo:tag@" + D256, "https://test:5000", "repo", D256, "tag"),
    ("docker://test:5000/repo:tag@" + D256, "https://test:5000", "repo", D256, "tag"),
    ("localhost/app", "https://localhost", "app", None, None),
    ("localhost:5000/team/app:v2", "https://localhost:5000", "team/app", "v2", None),
    ("127.0.0.1:5000/team/app:v1.0", "https://127.0.0.1:5000", "team/app", "v1.0", None),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "https://sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "https://b.gcr.io",
        "test.example.com/my-app",
        "test.example.com",
        None,
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "https://xn--n3h.com", "myimage", "xn--n3h.com", None),
    ("xn--7o8h.com/myimage:xn--7o8h.com@" + D512, "https://xn--7o8h.com", "myimage", D512, "xn--7o8h.com"),
    ("test-com:8080/foo", "https://test-com:8080", "foo", None, None),
    ("Example.COM/foo", "https://Example.COM", "foo", None, None),  # hosts may have capitals; paths may not
    ("gcr.io/google.com/project-id/hello-world", "https://gcr.io", "google.com/project-id/hello-world", None, None),
    ("mirror.gcr.io/ubuntu", "https://mirror.gcr.io", "ubuntu", None, None),  # library/ is Docker Hub's only
    ("192.168.1.1/repo", "https://192.168.1.1", "repo", None, None),
    ("192.168.1.1:5000/repo:5050", "https://192.168.1.1:5000", "repo", "5050", None),
    ("1.2.3.4.5/repo", "https://1.2.3.4.5", "repo", None, None),  # Docker's grammar: DNS-like labels
    ("[2001:db8::1]/repo", "https://[2001:db8::1]", "repo", None, None),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "https://[2001:db8:1:2:3:4:5:6]", "repo", "tag", None),
    ("[2001:db8::]:5000/repo", "https://[2001:db8::]:5000", "repo", None, None),
    ("[2001:DB8::1]:5000/repo:tag@" + D256, "https://[2001:DB8::1]:5000", "repo", D256, "tag"),
    ("[::1]:65535/repo", "https://[::1]:65535", "repo", None, None),
    # -- Docker Hub: no host, docker.io or index.docker.io; one component means library/
    ("ubuntu", HUB, "library/ubuntu", None, None),
    ("docker://ubuntu:22.04", HUB, "library/ubuntu", "22.04", None),
    ("test_com", HUB, "library/test_com", None, None),
    ("test.com:tag", HUB, "library/test.com", "tag", None),  # no '/': all of it is the name
    ("test.com:5000", HUB, "library/test.com", "5000", None),
    ("localhost:5000", HUB, "library/localhost", "5000", None),
    ("foo_bar.com:8080", HUB, "library/foo_bar.com", "8080", None),
    ("192.168.1.1", HUB, "library/192.168.1.1", None, None),
    ("192.168.1.1:tag", HUB, "library/192.168.1.1", "tag", None),
    ("lowercase:Uppercase", HUB, "library/lowercase", "Uppercase", None),
    ("foo/foo_bar.com:8080", HUB, "foo/foo_bar.com", "8080", None),
    ("library/ubuntu", HUB, "library/ubuntu", None, None),
    ("namespace/pathcomponent/image", HUB, "namespace/pathcomponent/image", None, None),
    ("docker.io/ubuntu", HUB, "library/ubuntu", None, None),
    ("docker.io/library/ubuntu:latest", HUB, "library/ubuntu", "latest", None),
    ("index.docker.io/dmcgowan/myapp", HUB, "dmcgowan/myapp", None, None),
    ("busybox:latest@" + D256, HUB, "library/busybox", D256, "latest"),
    ("busybox@" + D256, HUB, "library/busybox", D256, None),
    # -- repository components: separators '.', '_', '__', any run of '-'
    ("r.io/a.b/c_d/e__f/g-h/i---j/0", "https://r.io", "a.b/c_d/e__f/g-h/i---j/0", None, None),
    ("r.io/a", "https://r.io", "a", None, None),
    # -- tags: [A-Za-z0-9_][A-Za-z0-9._-]{0,127}
    (f"r.io/app:{TAG128}", "https://r.io", "app", TAG128, None),
    ("r.io/app:V1.0-rc_1", "https://r.io", "app", "V1.0-rc_1", None),
]

# (text, the part the message must name) -- every one is an InvalidError
INVALID: list[tuple[str, str]] = [
    # -- empty and missing parts
    ("", "empty"),
    (":justtag", "no repository before the tag or digest"),
    ("@" + D256, "no repository before the tag or digest"),
    ("test.com/", "no repository after host 'test.com'"),
    ("http://host", "no repository after host 'host'"),
    ("http://host/", "no repository after host 'host'"),
    ("http:///app", "no host"),
    # -- schemes, URL extras
    ("ftp://host/app", "not 'ftp'"),
    ("http://user:pw@host/app", "pass credentials as arguments"),
    ("http://host/app?x=1", "no query or fragment"),
    ("http://host/app#frag", "no query or fragment"),
    # -- hosts
    ("https://-foo/bar", "label '-foo'"),
    ("https://foo-/bar", "label 'foo-'"),
    ("https://a..b/x", "label ''"),
    ("https://reg.example./x", "label ''"),
    ("https://foo_bar.com/x", "label 'foo_bar'"),
    ("foo_bar.com/x", "label 'foo_bar'"),
    ("b@d.com/x", "host 'b@d.com': label 'b@d'"),
    ("https://h\u00e9.com/x", "label 'h\u00e9'"),
    ("a:b:c/x", "host 'a:b:c'"),
    ("http://host:0/x", "port '0'"),
    ("http://host:65536/x", "port '65536'"),
    ("host:99999/x", "port '99999'"),
    ("http://host:/x", "port ''"),
    ("http://host:http/x", "port 'http'"),
    ("[fe80::1%eth0]:5000/repo", "'[fe80::1%eth0]' is not an IPv6 address"),
    ("[fe80::1%@invalidzone]:5000/repo", "'[fe80::1%@invalidzone]' is not an IPv6 address"),
    ("[::ffff:1.2.3.4]/repo", "'[::ffff:1.2.3.4]' is not an IPv6 address"),
    ("[1:2:3:4:5:6:7:8:9]/repo", "'[1:2:3:4:5:6:7:8:9]' is not an IPv6 address"),
    ("[::1/repo", "host '[::1'"),
    ("http://::1/repo", "host '::1'"),
    # -- not a host, so a repository path: Docker refuses it there
    ("-foo/bar", "component '-foo'"),
    ("[2001:db8::1]", "invalid repository name '[2001'"),
    ("[2001:db8::1]:5000", "invalid repository name '[2001'"),
    ("[2001:db8::1]:tag", "invalid repository name '[2001'"),
    # -- repositories: lowercase, separators, components
    ("Uppercase:tag", "component 'Uppercase' must be lowercase"),
    ("Uppercase/lowercase:tag", "component 'Uppercase' must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "component 'Uppercase' must be lowercase"),
    ("http://host/Team/App", "invalid repository name 'Team/App'"),
    ("aa/asdf$$^/aa", "component 'asdf$$^'"),
    ("white space", "component 'white space'"),
    ("r.io/a___b", "component 'a___b'"),
    ("r.io/a..b", "component 'a..b'"),
    ("r.io/a-", "component 'a-'"),
    ("r.io/_a", "component '_a'"),
    ("r.io/.a", "component '.a'"),
    ("r.io/a//b", "component ''"),
    ("r.io/a/", "component ''"),
    ("http://host/app:bad/tag", "invalid repository name 'app:bad/tag'"),
    ("0123456789abcdef" * 4, "64 hex digits are an image ID"),
    # -- tags
    ("r.io/app:", "invalid reference name ''"),
    # Docker allows a leading "_"; an image-spec reference name (what a layout can hold) does not
    ("r.io/app:_x", "invalid reference name '_x'"),
    ("http://host/app:-v1", "invalid reference name '-v1'"),
    ("r.io/app:.v1", "invalid reference name '.v1'"),
    ("r.io/app:v/1", "component 'app:v'"),
    (f"r.io/app:{TAG128}x", f"invalid reference name '{TAG128}x'"),
    ("r.io/app:v1:v2", "invalid reference name 'v1:v2'"),
    # -- digests
    ("r.io/app@", "invalid digest ''"),
    ("repo@sha256:" + "f" * 34, "invalid sha256 digest 'sha256:" + "f" * 34 + "'"),
    ("http://host/app@sha256:abc", "invalid sha256 digest 'sha256:abc'"),
    ("r.io/app@sha256:" + "F" * 64, "invalid sha256 digest 'sha256:" + "F" * 64 + "'"),
    ("validname@invaliddigest:" + "f" * 64, "algorithm 'invaliddigest' is not supported"),
    ("r.io/app@" + D256[:-1], "invalid sha256 digest"),
    ("r.io/app@" + D256 + "@" + D256, "invalid digest"),
    ("r.io/app@" + D256 + ":tag", "invalid digest"),
]


@pytest.mark.parametrize(("text", "base_url", "repository", "reference", "tag"), VALID)
def test_valid_locations(text: str, base_url: str, repository: str, reference: str | None, tag: str | None) -> None:
    location = parse_registry_location(text)
    assert (location.base_url, location.repository, location.reference, location.tag) == (
        base_url,
        repository,
        reference,
        tag,
    )
    assert parse_registry_location(str(location)) == location  # str() is a URL that reads back the same


@pytest.mark.parametrize(("text", "part"), INVALID)
def test_invalid_locations(text: str, part: str) -> None:
    with pytest.raises(InvalidError) as info:
        parse_registry_location(text)
    message = str(info.value)
    assert message.startswith(f"invalid registry location {text!r}: "), message
    assert part in message, message


def test_the_whole_name_is_at_most_255_characters() -> None:
    repository = "a" + "/a" * 121  # 243 characters
    host = "h.io:50"  # host/repository: 7 + 1 + 243 + 4 = 255
    location = parse_registry_location(f"{host}/{repository}/bbb:tag")
    assert (location.base_url, location.repository, location.reference) == (
        "https://h.io:50",
        f"{repository}/bbb",
        "tag",
    )
    assert len(f"{location.host}/{location.repository}") == 255
    with pytest.raises(InvalidError) as info:
        parse_registry_location(f"http://{host}/{repository}/bbbb")
    assert "is 256 characters, over 255 (host/repository)" in str(info.value)
    # a tag does not count; Docker Hub counts as docker.io/library/
    long_name = "a" + "/a" * 127  # 255 characters
    with pytest.raises(
        InvalidError, match=r"name 'docker\.io/a/a/[a/]*…' is 265 characters, over 255 \(host/repository\)$"
    ):
        parse_registry_location(long_name)
    assert parse_registry_location(f"{long_name[10:]}:{'t' * 128}").repository == long_name[10:]
    with pytest.raises(
        InvalidError, match=r"name 'docker\.io/library/a+…' is 256 characters, over 255 \(host/repository\)$"
    ):
        parse_registry_location("a" * 238)
    assert parse_registry_location("a" * 237).repository == "library/" + "a" * 237


def test_repository_and_tag_checks_name_the_offending_part() -> None:
    assert validate_repository("a/b__c/d--e") == "a/b__c/d--e"
    with pytest.raises(InvalidError, match=r"^invalid repository name 'a/B/c': component 'B' must be lowercase"):
        validate_repository("a/B/c")
    with pytest.raises(InvalidError, match=r"^invalid repository name 'a+: 256 characters, over 255$"):
        validate_repository("a" * 256)
    with pytest.raises(InvalidError, match=r"^invalid repository name '': "):
        validate_repository("")
    with pytest.raises(InvalidError, match=r"^invalid repository name 7: "):
        validate_repository(7)
    assert validate_tag(TAG128) == TAG128
    with pytest.raises(InvalidError, match=f"^invalid reference name '{TAG128}x'"):
        validate_tag(TAG128 + "x")


def test_a_tag_is_kept_only_beside_a_digest() -> None:
    location = parse_registry_location("r.io/app:v1@" + D256)
    assert str(location) == "https://r.io/app:v1@" + D256
    assert str(dataclasses.replace(location, reference=None, tag=None)) == "https://r.io/app"
    with pytest.raises(InvalidError, match=r"^RegistryLocation: tag 'v1' is kept only beside a digest reference$"):
        dataclasses.replace(location, reference=None)
    with pytest.raises(InvalidError, match=r"^RegistryLocation: tag 'v1' is kept only beside a digest reference$"):
        RegistryLocation("https://r.io", "app", "v2", "v1")
    assert RegistryLocation("https://r.io", "app", "v2") == parse_registry_location("r.io/app:v2")


def test_the_location_is_a_str() -> None:
    with pytest.raises(TypeError, match=r"^registry location must be a str, not bytes$"):
        parse_registry_location(b"r.io/app")  # type: ignore[arg-type]


def test_cli_locations_read_the_same_grammar() -> None:
    assert parse_location("docker://ubuntu:22.04") == Location("registry", f"{HUB}/library/ubuntu", "22.04")
    assert parse_location("docker://127.0.0.1:5000/team/app") == Location(
        "registry", "https://127.0.0.1:5000/team/app", None
    )
    assert parse_location(f"http://127.0.0.1:5000/team/app:v1@{D256}") == Location(
        "registry", "http://127.0.0.1:5000/team/app", D256
    )
    with pytest.raises(InvalidError, match=r"host '-foo': label '-foo'"):
        parse_location("https://-foo/bar")
    with pytest.raises(InvalidError, match=r"component 'Upper' must be lowercase"):
        parse_location("docker://Upper/app")
    assert parse_location("ubuntu:22.04") == Location("layout", "ubuntu", "22.04")  # no scheme: a directory


async def test_open_registry_refuses_a_tag_with_a_digest() -> None:
    with pytest.raises(InvalidError, match=r"^open_registry takes a repository, not a tag or digest: "):
        await open_registry(f"http://127.0.0.1:1/team/app:v1@{D256}", docker_config=False)

"""Audio-feature math of the gpu_worker against the SyncTalk-2D Python reference (CPU only)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import librosa
import numpy as np
import pytest
import scipy.signal

from pipeline.gpu_worker import audio
from pipeline.gpu_worker import mel as mel_math
from tests.conftest import reference_file

TOL = 1e-4


def _librosa_reference_mel(wav: np.ndarray) -> np.ndarray:
    """SyncTalk-2D utils.melspectrogram, verbatim apart from explicit stft defaults; time-major."""
    emphasised = scipy.signal.lfilter([1, -0.97], [1], wav)
    spectrum = librosa.stft(
        y=emphasised, n_fft=800, hop_length=200, win_length=800,
        window="hann", center=True, pad_mode="constant",
    )
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    db = 20 * np.log10(np.maximum(np.exp(-5 * np.log(10)), np.dot(basis, np.abs(spectrum)))) - 20
    return np.clip((2 * 4.0) * ((db + 100) / 100) - 4.0, -4.0, 4.0).T


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return np.load(reference_file("speech_16k.npy"))


@pytest.fixture(scope="module")
def speech_reference(speech: np.ndarray) -> np.ndarray:
    return _librosa_reference_mel(speech)


def _sine(sample_rate: int, seconds: float = 1.0, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_tone_matches_python_reference_fixture() -> None:
    """The 640 ms tone's mel is (52, 80) and equals the stored SyncTalk reference within 1e-4."""
    tone = np.load(reference_file("tone_640ms_16k.npy"))
    expected = np.load(reference_file("tone_640ms_mel_reference.npy"))
    mel = mel_math.melspectrogram(tone)
    assert mel.shape == (52, 80) == expected.shape
    assert mel.dtype == np.float32
    assert np.abs(mel - expected).max() <= TOL


def test_speech_matches_librosa_reference(speech: np.ndarray, speech_reference: np.ndarray) -> None:
    """20.9 s of real speech gives (1674, 80), equal to the librosa-based reference within 1e-4."""
    mel = mel_math.melspectrogram(speech)
    assert mel.shape == (1674, 80) == speech_reference.shape
    assert np.abs(mel - speech_reference).max() <= TOL


def test_symmetric_hann_window_fails_the_tolerance(
    speech: np.ndarray, speech_reference: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Go server's symmetric Hann (np.hanning) misses the reference by > 1e-4: caught."""
    monkeypatch.setattr(mel_math, "_hann_periodic", lambda: np.hanning(mel_math.N_FFT))
    mel = mel_math.melspectrogram(speech)
    assert np.abs(mel - speech_reference).max() > TOL


@pytest.mark.parametrize("n", [0, 1, 2, 3, 199, 200, 201, 399, 400, 401, 10239, 10240, 16000])
def test_mel_has_one_plus_n_div_200_frames(n: int) -> None:
    """A mel of n samples has 1 + n // 200 time-major rows of 80 bins, including n = 0."""
    rng = np.random.default_rng(n)
    mel = mel_math.melspectrogram(rng.uniform(-1, 1, n).astype(np.float32))
    assert mel.shape == (1 + n // 200, 80)
    assert mel.dtype == np.float32


@pytest.mark.filterwarnings("ignore:n_fft=800 is too large:UserWarning")
def test_short_audio_matches_reference() -> None:
    """Audio shorter than one hop (1 and 199 samples) still equals the reference within 1e-4."""
    rng = np.random.default_rng(7)
    for n in (1, 199, 201):
        wav = rng.uniform(-1, 1, n).astype(np.float32)
        assert np.abs(mel_math.melspectrogram(wav) - _librosa_reference_mel(wav)).max() <= TOL


@pytest.mark.parametrize("n", [0, 1, 800, 16000])
def test_silence_is_minus_four_everywhere(n: int) -> None:
    """Digital silence (and empty audio) sits at the amplitude floor: -4 after normalisation."""
    mel = mel_math.melspectrogram(np.zeros(n, dtype=np.float32))
    assert np.all(mel == -4.0)


def test_values_stay_within_plus_minus_four() -> None:
    """Normalisation clips to [-4, 4], reaching +4 for a (deliberately) overloaded signal."""
    rng = np.random.default_rng(1)
    speechlike = rng.uniform(-1, 1, 16000).astype(np.float32)
    overloaded = 100.0 * speechlike
    for wav in (speechlike, overloaded):
        mel = mel_math.melspectrogram(wav)
        assert mel.min() >= -4.0 and mel.max() <= 4.0
    assert mel_math.melspectrogram(overloaded).max() == 4.0
    assert mel_math.melspectrogram(speechlike).max() > -4.0


def test_the_filterbank_is_librosas_bit_for_bit() -> None:
    """The Slaney filterbank built in numpy equals librosa.filters.mel's, every weight."""
    reference = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    ours = mel_math._mel_basis()
    assert ours.dtype == reference.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


def test_warm_up_builds_the_filterbank_once() -> None:
    """warm_up() builds the mel filterbank, and later requests reuse it without rebuilding."""
    mel_math._mel_basis.cache_clear()
    mel_math._mel_projection.cache_clear()
    mel_math.warm_up()
    assert mel_math._mel_basis.cache_info().misses == 1
    assert mel_math._mel_projection.cache_info().misses == 1
    mel_math.melspectrogram(np.zeros(4000, dtype=np.float32))
    mel_math.melspectrogram(np.zeros(9000, dtype=np.float32))
    assert mel_math._mel_basis.cache_info().misses == 1
    assert mel_math._mel_projection.cache_info().misses == 1


def test_reused_buffers_leave_no_stale_audio(speech: np.ndarray) -> None:
    """A short mel after a long loud one is unaffected by the reused per-thread buffers."""
    mel_math.melspectrogram(100.0 * speech)
    assert np.all(mel_math.melspectrogram(np.zeros(1000, dtype=np.float32)) == -4.0)
    short = speech[:30000]
    assert np.abs(mel_math.melspectrogram(short) - _librosa_reference_mel(short)).max() <= TOL


def test_audio_longer_than_kept_buffer_is_exact(
    speech: np.ndarray, speech_reference: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audio past the kept-buffer limit (long uploads) takes a fresh buffer and stays exact."""
    monkeypatch.setattr(mel_math, "_MAX_KEPT_SAMPLES", 10_000)
    assert np.abs(mel_math.melspectrogram(speech) - speech_reference).max() <= TOL


def test_concurrent_threads_get_their_own_results(speech: np.ndarray) -> None:
    """Mels computed from 4 threads at once equal the same mels computed one by one."""
    inputs = [speech[: 16000 * s + 37 * s] for s in (1, 3, 7, 13)] * 4
    expected = [mel_math.melspectrogram(x) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            results = list(pool.map(mel_math.melspectrogram, inputs))
            assert all(np.array_equal(r, e) for r, e in zip(results, expected, strict=True))


@pytest.mark.parametrize("rate", [48000, 22050])
def test_resampled_sine_matches_native_16k_mel(rate: int) -> None:
    """A 1 kHz sine at 48 / 22.05 kHz gives the 16 kHz sine's mel (inner rows within 1e-3)."""
    native = mel_math.melspectrogram(_sine(16000))
    mel = mel_math.melspectrogram(_sine(rate), sample_rate=rate)
    assert mel.shape == native.shape
    # The first and last two rows see the resampler's edge transient; the rest must agree.
    assert np.abs(mel[2:-2] - native[2:-2]).max() <= 1e-3
    assert np.array_equal(mel, mel_math.melspectrogram(mel_math.resample_to_16k(_sine(rate), rate)))


def test_resample_is_identity_at_16k() -> None:
    """At 16 kHz the samples pass through unchanged, as float32."""
    wav = _sine(16000)
    out = mel_math.resample_to_16k(wav, 16000)
    assert out.dtype == np.float32
    assert np.array_equal(out, wav)


def test_resample_changes_length_by_rate() -> None:
    """One second at 48 kHz becomes one second (16000 samples) of float32 at 16 kHz."""
    out = mel_math.resample_to_16k(_sine(48000), 48000)
    assert out.dtype == np.float32 and out.shape == (16000,)


@pytest.mark.parametrize("rate", [0, -16000, 7999, 192001, 1_000_000])
def test_invalid_sample_rate_raises(rate: int) -> None:
    """A sample rate outside [8000, 192000] Hz is a ValueError naming the rate."""
    with pytest.raises(ValueError, match=str(rate)):
        mel_math.resample_to_16k(_sine(16000), rate)
    with pytest.raises(ValueError):
        mel_math.melspectrogram(_sine(16000), sample_rate=rate)


@pytest.mark.parametrize("rate", [8000, 192000])
def test_boundary_sample_rates_are_accepted(rate: int) -> None:
    """The limits 8000 and 192000 Hz themselves are valid rates."""
    assert mel_math.melspectrogram(_sine(rate, 0.1), sample_rate=rate).shape[1] == 80


def test_window_starts_follow_the_spec_table() -> None:
    """With M = 100: j=0→[0:16], 1→[3:19], 10→[32:48], 24→[76:92], 30 clamps to [84:100]."""
    table = {0: 0, 1: 3, 10: 32, 24: 76, 30: 84}
    assert {j: audio.window_start(j, 100) for j in table} == table


@pytest.mark.parametrize("m, count", [(52, 13), (74, 20), (100, 28), (1674, 520), (16, 2)])
def test_window_count_is_python_reference_data_len(m: int, count: int) -> None:
    """window_count(M) = int((M - 16) / 80 * 25) + 2, e.g. 13 for M = 52, 520 for M = 1674."""
    assert audio.window_count(m) == count


def test_window_count_and_start_match_reference_expressions() -> None:
    """Count and start equal the reference's float expressions, quirks included (M=384→116)."""
    for m in range(16, 6000):
        assert audio.window_count(m) == int((m - 16) / 80.0 * float(25)) + 2
    assert audio.window_count(384) == 116  # exact arithmetic would give 117
    for m in (16, 17, 52, 100, 1674):
        for j in range(audio.window_count(m) + 5):
            start = int(80.0 * (j / float(25)))
            if start + 16 > m:
                start = m - 16
            assert audio.window_start(j, m) == start


def test_window_count_never_negative() -> None:
    """Short mels never give a negative count: a mel under 16 rows counts as padded to 16."""
    assert all(audio.window_count(m) == 2 for m in range(0, 17))


def test_mel_windows_are_transposed_slices() -> None:
    """mel_windows gives [N,1,80,16] float32 with window j = mel[start_j:start_j+16].T."""
    rng = np.random.default_rng(3)
    mel = rng.uniform(-4, 4, (100, 80)).astype(np.float32)
    windows = audio.mel_windows(mel)
    assert windows.shape == (28, 1, 80, 16) and windows.dtype == np.float32
    assert windows.flags.c_contiguous
    for j in range(28):
        s = audio.window_start(j, 100)
        assert np.array_equal(windows[j, 0], mel[s : s + 16].T)
    assert np.array_equal(windows[27, 0], mel[84:100].T)  # end-clamped


@pytest.mark.parametrize("m", [1, 5, 15])
def test_short_mel_is_padded_with_silence(m: int) -> None:
    """A mel under 16 rows is padded at the end with -4 to 16 rows, giving 2 windows, no crash."""
    rng = np.random.default_rng(m)
    mel = rng.uniform(-3, 3, (m, 80)).astype(np.float32)
    windows = audio.mel_windows(mel)
    assert windows.shape == (2, 1, 80, 16)
    assert np.array_equal(windows[0, 0, :, :m], mel.T)
    assert np.all(windows[0, 0, :, m:] == -4.0)
    assert np.array_equal(windows[1], windows[0])


def _constant_rows(n: int) -> np.ndarray:
    """Encoder outputs f_k whose 512 values all equal k + 1 (so a zero row is recognisable)."""
    return np.repeat(np.arange(1, n + 1, dtype=np.float32)[:, None], audio.ENCODED_DIM, axis=1)


def _reference_frame(encoded: np.ndarray, i: int) -> np.ndarray:
    """Clean-rule transliteration of SyncTalk get_audio_features on P = [f0, f0, f.., f_last]."""
    n = encoded.shape[0]
    p = np.concatenate([encoded[:1], encoded, encoded[-1:]]) if n else encoded[:0]
    rows = np.zeros((16, 512), np.float32)
    for r, idx in enumerate(range(i - 8, i + 8)):
        if 0 <= idx < p.shape[0]:
            rows[r] = p[idx]
    return rows.reshape(32, 16, 16)


def test_frame_zero_layout() -> None:
    """Frame 0 is rows [0×8, f0, f0, f1..f6]; channel c holds row c//2, features (c%2)*256.."""
    encoded = _constant_rows(13)
    frame = audio.frame_features(encoded, 1)[0]
    row_values = [0.0] * 8 + [1, 1, 2, 3, 4, 5, 6, 7]
    assert frame.shape == (32, 16, 16)
    for c in range(32):
        assert np.all(frame[c] == row_values[c // 2])
    # The C-order reshape: channel c is the flat slice c*256 .. c*256+255 of the [16,512] block.
    rng = np.random.default_rng(5)
    encoded = rng.standard_normal((13, 512)).astype(np.float32)
    frame = audio.frame_features(encoded, 1)[0]
    assert np.array_equal(frame[17].ravel(), encoded[0, 256:])  # row 8 = f0, second half
    assert np.array_equal(frame[20].ravel(), encoded[1, :256])  # row 10 = f1, first half


def test_frames_match_clean_rule_reference() -> None:
    """Every frame equals the clean-rule reference, including partly and fully zero frames."""
    rng = np.random.default_rng(11)
    for n in (0, 1, 2, 13, 20):
        encoded = rng.standard_normal((n, 512)).astype(np.float32)
        frames = audio.frame_features(encoded, 40)
        for i in range(40):
            assert np.array_equal(frames[i], _reference_frame(encoded, i)), (n, i)


@pytest.mark.parametrize("n", range(14))
def test_frames_past_the_audio_are_zero_and_nothing_crashes(n: int) -> None:
    """B = 32 works for N = 0..13 (Go panicked); frames i >= N+10 are all zero, frame N+9 is not."""
    frames = audio.frame_features(_constant_rows(n), 32)
    assert frames.shape == (32, 32, 16, 16) and frames.dtype == np.float32
    assert np.all(frames[n + 10 :] == 0.0)
    if n > 0:
        # Frame N+9 still sees P[N+1] = f_{N-1} in its first row, then zeros.
        assert np.all(frames[n + 9, :2] == n) and np.all(frames[n + 9, 2:] == 0.0)
    else:
        assert np.all(frames == 0.0)


def test_first_frame_matches_whole_audio() -> None:
    """frame_features(enc, B, first_frame=k)[i] == frame_features(enc, k + B)[k + i]."""
    rng = np.random.default_rng(2)
    for n in (0, 1, 5, 42):
        encoded = rng.standard_normal((n, 512)).astype(np.float32)
        for k in (0, 1, 7, 8, 30, 60):
            for b in (1, 4, 25):
                whole = audio.frame_features(encoded, k + b)
                part = audio.frame_features(encoded, b, first_frame=k)
                assert np.array_equal(part, whole[k:]), (n, k, b)


def test_frame_features_writes_into_out() -> None:
    """With out given, every element is overwritten (stale NaNs gone) and out is returned."""
    encoded = _constant_rows(3)
    out = np.full((32, 32, 16, 16), np.nan, dtype=np.float32)
    result = audio.frame_features(encoded, 32, out=out)
    assert result is out
    assert np.array_equal(out, audio.frame_features(encoded, 32))
    with pytest.raises(ValueError):
        audio.frame_features(encoded, 4, out=np.zeros((3, 32, 16, 16), np.float32))


def test_frame_features_rejects_bad_shapes() -> None:
    """Encoder outputs that are not [N, 512] and a negative first_frame are ValueErrors."""
    with pytest.raises(ValueError):
        audio.frame_features(np.zeros((4, 256), np.float32), 2)
    with pytest.raises(ValueError):
        audio.frame_features(_constant_rows(4), 2, first_frame=-1)


@pytest.mark.parametrize("b", [1, 3, 32])
def test_replicated_features_copies_one_frame_to_all(b: int) -> None:
    """32768 bytes of float32 LE become [B,32,16,16] with the same tensor in every frame."""
    frame = np.arange(8192, dtype="<f4")
    for payload in (frame.tobytes(), memoryview(frame.tobytes())):
        out = audio.replicated_features(payload, b)
        assert out.shape == (b, 32, 16, 16) and out.dtype == np.float32
        for i in range(b):
            assert np.array_equal(out[i].ravel(), frame)
        out[0, 0, 0, 0] = -1.0  # writable and independent per frame
        assert out[-1, 0, 0, 0] == (0.0 if b > 1 else -1.0)


@pytest.mark.parametrize("size", [0, 4, 32764, 32772, 65536])
def test_replicated_features_size_check(size: int) -> None:
    """Any size but 32768 bytes is rejected with the original's exact message."""
    expected = f"Invalid audio features size: got {size} bytes, expected 32768 bytes"
    with pytest.raises(ValueError) as err:
        audio.replicated_features(b"\0" * size, 2)
    assert str(err.value) == expected


_SWEEP_LENGTHS = sorted(
    {0, 1, 2, 3, 4, 7, 100, 199, 200, 201, 399, 400, 1000, 2999, 3000, 3200, 3201, 3399,
     3400, 5000, 6399, 6400, 9600, 10239, 10240, 10241, 12800, 14720, 16000, 25600, 30080,
     40000, 64000, 99999, 128000, 160000}
)


@pytest.mark.parametrize("n", _SWEEP_LENGTHS)
def test_any_length_and_batch_size_gives_finite_features(n: int) -> None:
    """mel → windows → stand-in encoder → frame_features: finite [B,32,16,16], B = 1..32."""
    rng = np.random.default_rng(n)
    mel = mel_math.melspectrogram(rng.uniform(-1, 1, n).astype(np.float32))
    windows = audio.mel_windows(mel)
    assert windows.shape == (audio.window_count(mel.shape[0]), 1, 80, 16)
    encoded = windows.reshape(windows.shape[0], -1)[:, :512]  # a stand-in [N, 512] encoder
    for b in range(1, 33):
        frames = audio.frame_features(encoded, b)
        assert frames.shape == (b, 32, 16, 16) and frames.dtype == np.float32
        assert np.isfinite(frames).all()
        assert np.array_equal(frames[0, 16:18].ravel(), encoded[0])  # row 8 of frame 0 is f0


def _fake_encoder(windows: np.ndarray) -> np.ndarray:
    """A deterministic stand-in [N,1,80,16] -> [N,512] that depends on every value."""
    flat = windows.reshape(len(windows), -1).astype(np.float64)
    weights = np.sin(np.arange(flat.shape[1] * 4, dtype=np.float64)).reshape(flat.shape[1], 4)
    return np.repeat(flat @ weights, 128, axis=1).astype(np.float32)


@pytest.mark.parametrize("batches", [[1] * 9, [3, 5, 7, 11, 2], [32, 20], [8] * 6])
def test_streamed_features_equal_the_whole_audio_at_once(speech: np.ndarray, batches: list[int]) -> None:
    """Frames computed batch by batch from audio slices equal those of the whole audio."""
    frames = sum(batches)
    whole = np.zeros((frames + 15) * 640, np.float32)  # flushed: padded with silence
    n = min(len(speech), frames * 640 - 123)
    whole[:n] = speech[20000 : 20000 + n]
    expected = audio.frame_features(
        _fake_encoder(audio.mel_windows(mel_math.melspectrogram(whole))), frames)
    first = 0
    for b in batches:
        lo, hi = audio.stream_samples(first, b)
        offset = lo - 200 * (first % 3)  # any hop-aligned start at or before lo works
        offset = max(0, offset)
        got = audio.stream_frame_features(_fake_encoder, whole[offset:hi + 7], offset, first, b)
        np.testing.assert_array_equal(got, expected[first : first + b])
        first += b


def test_stream_frame_features_refuses_audio_that_does_not_cover_its_frames() -> None:
    """A slice missing samples the frames need is an error, not wrong frames."""
    lo, hi = audio.stream_samples(40, 4)
    samples = np.zeros(hi - lo, np.float32)
    audio.stream_frame_features(_fake_encoder, samples, lo, 40, 4)
    with pytest.raises(ValueError, match="does not cover"):
        audio.stream_frame_features(_fake_encoder, samples[:-1], lo, 40, 4)
    with pytest.raises(ValueError, match="does not cover"):
        audio.stream_frame_features(_fake_encoder, samples, lo + 200, 40, 4)
